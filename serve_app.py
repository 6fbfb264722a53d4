"""Ray Serve entry point for a finished study.

    serve run serve_app:app study_dir=runs/quickstart
    serve run serve_app:app study_dir=s3://bucket/cxr-ray/kaggle_backbones arm=resnet50 replicas=auto

Arguments (Serve application-builder arguments, all optional but one of study_dir/checkpoint):
study_dir, arm, checkpoint, ensemble (true/false), site, threshold_policy (e.g. sensitivity:0.95),
prevalence (the site's expected fraction of pneumonia, e.g. 0.3), replicas
(N or auto), max_replicas, max_batch_size, batch_wait_ms,
gpus_per_replica, max_upload_mb, upload_timeout_s, decode_timeout_s, decode_workers, inflight_mb,
max_ongoing_requests, max_queued_requests, allowed_hosts and allow_origins (comma-separated), and
host: the address Serve binds, for the Host allowlist (give 0.0.0.0 when Serve's HTTP options do).
Serve binds 127.0.0.1:8000 unless its HTTP options say otherwise; README "Security" lists the limits.
"""
from cxr_ray.serving import build


def app(args: dict):
    return build(**args)
