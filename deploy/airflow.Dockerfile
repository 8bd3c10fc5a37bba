# Airflow 3 with the project's pinned dependencies, the provider and the DAG bundle.
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless maven \
    && rm -rf /var/lib/apt/lists/*
USER airflow
COPY --chown=airflow requirements.txt pyproject.toml /opt/k2/
COPY --chown=airflow include /opt/k2/include
COPY --chown=airflow plugins /opt/k2/plugins
COPY --chown=airflow dags /opt/k2/dags
COPY --chown=airflow spark_jobs /opt/k2/spark_jobs
RUN pip install --no-cache-dir -r /opt/k2/requirements.txt && pip install --no-cache-dir --no-deps -e /opt/k2 \
    && mvn -q -f /opt/k2/spark_jobs/pom.xml dependency:copy-dependencies -DoutputDirectory=jars
