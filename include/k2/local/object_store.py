"""An S3-compatible object store on loopback for the Iceberg warehouse: the Versity S3 Gateway
(versitygw, Apache-2.0, built by `make setup` with `go install`) serving a folder of the stack
home through its posix backend, for `k2 local up --object-store` and the tests. Executors on
other hosts share a warehouse on object storage; they cannot share a local path.

Port: K2_OBJECT_STORE_PORT (7070). The root user's keys are the stack's credentials
(credentials.json), handed to the gateway through its environment, never its command line.
The bucket `k2-warehouse` is made at start; the warehouse is s3://k2-warehouse/warehouse.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from k2.local.daemons import Daemon, http_ok
from k2.local.monitoring import TOOLS_BIN
from k2.local.processes import StackError
from k2.local.settings import LOOPBACK, LocalStack, StackHome, _env_int, default_home
from k2.iceberg import arrow_s3_options
from k2.runtime_env import IcebergSettings

PORT_ENV = "K2_OBJECT_STORE_PORT"
BUCKET = "k2-warehouse"
WAREHOUSE = f"s3://{BUCKET}/warehouse"
REGION = "us-east-1"


@dataclass(frozen=True)
class ObjectStore(StackHome):
    home: Path
    port: int = 7070
    host: str = LOOPBACK
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)

    @classmethod
    def for_local_stack(cls, stack: LocalStack) -> ObjectStore:
        c = stack.credentials
        return cls(home=default_home(stack.home), port=_env_int(PORT_ENV, 7070), host=stack.host,
                   access_key_id=c["s3_access_key_id"], secret_access_key=c["s3_secret_access_key"])

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        """The gateway's root: each folder a bucket, each file below it an object."""
        return self.home / "object-store"

    def iceberg_settings(self, base: IcebergSettings, warehouse: str = WAREHOUSE) -> IcebergSettings:
        """`base` (the catalog) with its warehouse on this store."""
        return replace(base, warehouse=warehouse, s3_endpoint=self.endpoint, s3_region=REGION,
                       s3_access_key_id=self.access_key_id, s3_secret_access_key=self.secret_access_key,
                       s3_path_style_access=True)

    def filesystem(self) -> Any:
        """pyarrow's S3FileSystem on this store, as the jobs open it (k2.iceberg), making buckets."""
        import pyarrow.fs as pafs

        options = arrow_s3_options(self.iceberg_settings(IcebergSettings("", "", "", "", WAREHOUSE)))
        return pafs.S3FileSystem(**options, allow_bucket_creation=True)

    def ensure_bucket(self, bucket: str = BUCKET) -> None:
        import pyarrow.fs as pafs

        fs = self.filesystem()
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            fs.create_dir(bucket)


def versitygw() -> str:
    binary = TOOLS_BIN / "versitygw"
    if not binary.is_file():
        raise StackError(f"versitygw is not installed in {TOOLS_BIN}: run `make setup`")
    return str(binary)


def _argv(store: ObjectStore) -> list[str]:
    store.data_dir.mkdir(parents=True, exist_ok=True)
    return [versitygw(), "--port", f"{store.host}:{store.port}", "--health", "/health", "--quiet",
            "posix", str(store.data_dir)]


GATEWAY = Daemon(
    name="object-store",
    argv=_argv,
    port=lambda s: s.port,
    port_env_var=PORT_ENV,
    healthy=lambda s: http_ok(f"{s.endpoint}/health"),
    # the root user's keys: in the environment only
    env=lambda s: {"ROOT_ACCESS_KEY_ID": s.access_key_id, "ROOT_SECRET_ACCESS_KEY": s.secret_access_key},
)


def start(store: ObjectStore) -> bool:
    started = GATEWAY.start(store)
    store.ensure_bucket()
    return started


def running(stack: LocalStack) -> ObjectStore | None:
    """The stack's object store when its gateway runs (`k2 local up --object-store`), else None."""
    store = ObjectStore.for_local_stack(stack)
    return store if GATEWAY.pid(store) is not None else None
