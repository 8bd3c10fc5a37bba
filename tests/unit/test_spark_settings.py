"""The local stack's Spark settings: spark_jobs/conf turned into the driver JVM's options, and
the class-data archive used only where `make setup` made it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from k2.config import SPARK_JARS_DIR
from k2.local import settings


def _conf_dir(tmp_path: Path, defaults: str) -> Path:
    (tmp_path / "spark-defaults.conf").write_text(defaults)
    (tmp_path / "log4j2.properties").write_text("rootLogger.level = warn\n")
    return tmp_path


def test_every_setting_of_the_shipped_defaults_becomes_a_jvm_option() -> None:
    options = settings.spark_java_options(archive="none").split()
    shipped = [
        line.split(None, 1) for line in (settings.SPARK_CONF_DIR / "spark-defaults.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert shipped, "spark-defaults.conf lists no settings"
    for key, value in shipped:
        if key == "spark.driver.extraJavaOptions":
            assert all(flag in options for flag in value.split())
        else:
            assert f"-D{key}={value.strip()}" in options
    assert f"-Dlog4j2.configurationFile={settings.SPARK_CONF_DIR / 'log4j2.properties'}" in options


def test_the_archive_is_used_only_when_it_exists_and_dumped_to_a_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "cds" / "driver.jsa"
    monkeypatch.setattr(settings, "SPARK_CLASS_ARCHIVE", archive)
    monkeypatch.setattr(settings, "SPARK_CLASS_ARCHIVE_PARTIAL", archive.with_suffix(".jsa.tmp"))
    assert "SharedArchiveFile" not in settings.spark_java_options()  # not made: a JVM without it
    assert settings.spark_java_options(archive="dump").endswith(f"-XX:ArchiveClassesAtExit={archive}.tmp")
    archive.parent.mkdir()
    archive.write_bytes(b"jsa")
    assert settings.spark_java_options().endswith(f"-XX:SharedArchiveFile={archive}")
    assert "SharedArchiveFile" not in settings.spark_java_options(archive="none")


def test_the_conf_dir_the_launcher_sees_holds_nothing() -> None:
    """The launcher puts SPARK_CONF_DIR on the class path; the JVM shares classes only when
    that folder is absent or empty."""
    env = settings.spark_environment(settings.LOOPBACK)
    conf_dir = Path(env["SPARK_CONF_DIR"])
    assert not conf_dir.exists() or not any(conf_dir.iterdir())
    assert env["SPARK_LOCAL_IP"] == settings.LOOPBACK


@pytest.mark.parametrize("line", ["spark.app.name my job", "spark.driver.host", "spark.x 'quoted'"])
def test_a_value_the_jvm_options_cannot_carry_is_refused_naming_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str
) -> None:
    monkeypatch.setattr(settings, "SPARK_CONF_DIR", _conf_dir(tmp_path, f"# comment\n{line}\n"))
    with pytest.raises(ValueError, match=r"spark-defaults.conf:2: spark\.(app\.name|driver\.host|x)"):
        settings.spark_java_options(archive="none")


def test_the_jobs_jars_are_on_the_jvms_own_class_path() -> None:
    """--jars classes come through Spark's class loader, which no class-data archive holds;
    the local stack also lists the jars in SPARK_DIST_CLASSPATH, which the launcher puts on
    the JVM's class path, in one fixed order (an archive only fits the class path it was
    made with)."""
    env = settings.spark_environment(settings.LOOPBACK)
    entries = env["SPARK_DIST_CLASSPATH"].split(os.pathsep)
    assert entries == sorted(entries)
    assert {Path(e).name for e in entries} == {p.name for p in SPARK_JARS_DIR.glob("*.jar")}
    assert any(Path(e).name.startswith("iceberg-spark-runtime") for e in entries)
