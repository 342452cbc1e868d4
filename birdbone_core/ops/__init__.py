"""Operations around a run: artifacts to S3-backed DVC (artifacts.py), step metrics to a Prometheus
Pushgateway (metrics.py), and their `birdbone publish` / `birdbone pull` commands (cli.py).

Every import of dvc / s3fs / prometheus_client is lazy: the core package works without the `ops` extra."""
