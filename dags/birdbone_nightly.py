"""birdbone_nightly: every night, compress each new checkpoint that has landed in S3, exactly once, and
publish the result, by triggering one birdbone_compress run per checkpoint.

Source: `s3://<bucket>/<prefix>/<checkpoint>/...` (Variables birdbone_nightly_bucket / _prefix, the S3
connection birdbone_aws_conn_id; see operators/settings.py `nightly()`). A checkpoint counts only once its
completion marker `<prefix>/<checkpoint>/_COMPLETE` exists: the uploader writes that object last, so a
checkpoint still being copied is never picked up. The sensor (S3KeySensor on `<prefix>/*/_COMPLETE`,
reschedule mode) waits up to SENSOR_TIMEOUT for a marker whose checkpoint needs work, else the run is
skipped.

Identity: a checkpoint's key is the sha256 over the sorted (key relative to the checkpoint, size, ETag)
list of its objects, the marker excluded. The same bytes under another name give the same key (compressed
once); a changed checkpoint gives a new key. ETags are MD5s of the bytes for single-part uploads; multipart
uploads must use the same part size (SSE-KMS objects: the same upload) to be recognised as the same bytes.

Exactly once, with retries: attempt k of a checkpoint is the birdbone_compress run
`nightly__ckpt-<key[:16]>` (k = 1) or `nightly__ckpt-<key[:16]>-a<k>`, with run directory the same name
minus `nightly__`. Each tick reads those runs' states through the Task SDK (`ti.get_dr_count`):
  - any attempt succeeded                 -> done, nothing is triggered;
  - any attempt queued or running         -> in flight, nothing is triggered;
  - none yet                              -> attempt 1 is triggered;
  - all failed, fewer than max_attempts   -> the next attempt is triggered (Variable
                                             birdbone_nightly_max_attempts, default 3);
  - all max_attempts failed               -> alerted once (operators.signals.alert, alert
                                             "nightly_checkpoint_failed", key = key[:16]); the alerted keys
                                             are kept in Variable birdbone_nightly_alerted (a JSON list).
The trigger skips a run id that already exists, so a re-run or overlapping tick never triggers twice. To
retry an alerted checkpoint, clear its last failed birdbone_compress run (or raise max_attempts).

Each compress run gets conf {"model": "s3://<bucket>/<prefix>/<checkpoint>/", "recipe": <Variable
birdbone_nightly_recipe>, "run_id": <run directory>, "publish": true}.
"""
from __future__ import annotations

import hashlib
import sys
from datetime import timedelta
from pathlib import Path

from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowFailException

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from operators import settings, signals

COMPRESS_DAG_ID = "birdbone_compress"
MARKER = "_COMPLETE"                       # written last by the uploader: the checkpoint is complete
ALERTED_VAR = "birdbone_nightly_alerted"   # JSON list of checkpoint keys already alerted
ALERT_NAME = "nightly_checkpoint_failed"
RUN_PREFIX = "nightly__"
SENSOR_TIMEOUT = timedelta(hours=6)        # from 02:00, wait until 08:00 for a new checkpoint
SENSOR_POKE = timedelta(minutes=10)


def source(params: dict | None = None) -> dict:
    """settings.nightly(), with the DAG's bucket / prefix / recipe params (when given) over the Variables."""
    out = settings.nightly()
    for k in ("bucket", "prefix", "recipe"):
        v = (params or {}).get(k)
        if v:
            out[k] = str(v).strip().strip("/") if k != "recipe" else str(v)
    if not out["bucket"]:
        raise AirflowFailException("no checkpoint bucket: set Variable birdbone_nightly_bucket (or the bucket param)")
    return out


def _base(prefix: str) -> str:
    return f"{prefix}/" if prefix else ""


def marker_glob(params: dict | None = None) -> str:
    """The sensor's wildcard: every checkpoint's completion marker."""
    src = source(params)
    return f"s3://{src['bucket']}/{_base(src['prefix'])}*/{MARKER}"


def aws_conn_id() -> str:
    return settings.nightly()["aws_conn_id"]


def content_hash(objects: list[dict], base: str) -> str:
    """sha256 over the sorted (key relative to `base`, size, ETag) list of a checkpoint's objects."""
    h = hashlib.sha256()
    for rel, size, etag in sorted((o["Key"][len(base):], int(o["Size"]), str(o.get("ETag", "")).strip('"'))
                                  for o in objects):
        h.update(f"{rel}\0{size}\0{etag}\n".encode())
    return h.hexdigest()


def complete_checkpoints(listing, prefix: str) -> list[dict]:
    """The checkpoints of an S3 listing (dicts with Key, Size, ETag) that have their marker, with their
    key; one per key (the first name wins when identical checkpoints sit under several names)."""
    base = _base(prefix)
    groups: dict[str, list[dict]] = {}
    for o in listing:
        rest = o["Key"][len(base):] if o["Key"].startswith(base) else None
        if not rest or "/" not in rest:
            continue
        groups.setdefault(rest.split("/", 1)[0], []).append(o)
    out, seen = [], set()
    for name in sorted(groups):
        objs = groups[name]
        root = f"{base}{name}/"
        marker = f"{root}{MARKER}"
        if not any(o["Key"] == marker for o in objs):
            continue                                   # still being copied (or abandoned)
        data = [o for o in objs if o["Key"] != marker]
        if not data:
            continue
        key = content_hash(data, root)
        if key in seen:
            continue
        seen.add(key)
        out.append({"name": name, "key": key, "root": root, "objects": len(data)})
    return out


def run_name(key: str, attempt: int) -> str:
    """Run directory (and, after RUN_PREFIX, Airflow run id) of attempt `attempt` at a checkpoint key."""
    return f"ckpt-{key[:16]}" + (f"-a{attempt}" if attempt > 1 else "")


def dr_counter(ti):
    """count(run_ids, states) over birdbone_compress runs, through the Task SDK (no DB access in tasks)."""
    def count(run_ids: list[str], states: list[str] | None = None) -> int:
        return int(ti.get_dr_count(dag_id=COMPRESS_DAG_ID, run_ids=run_ids, states=states))
    return count


def plan(checkpoints: list[dict], src: dict, count, alerted) -> dict:
    """What to do now: {"triggers": [TriggerDagRunOperator kwargs], "alerts": [...], "waiting": [...],
    "done": [...]}. `count(run_ids, states)` counts birdbone_compress runs; `alerted`: keys already alerted."""
    triggers, alerts, waiting, done = [], [], [], []
    max_attempts = int(src["max_attempts"])
    for c in checkpoints:
        uri = f"s3://{src['bucket']}/{c['root']}"
        ids = [RUN_PREFIX + run_name(c["key"], k) for k in range(1, max_attempts + 1)]
        n = count(ids)
        if n and count(ids, ["success"]):
            done.append(uri)
            continue
        if n and count(ids, ["queued", "running"]):
            waiting.append(uri)
            continue
        attempt = 1 if n == 0 else next((k for k, rid in enumerate(ids, 1) if not count([rid])), None)
        if attempt is None:                            # every attempt exists and failed
            if c["key"][:16] not in alerted:
                alerts.append({"checkpoint": uri, "name": c["name"], "key": c["key"][:16],
                               "attempts": max_attempts, "last_run_id": ids[-1]})
            continue
        name = run_name(c["key"], attempt)
        triggers.append({
            "trigger_run_id": RUN_PREFIX + name,
            "conf": {"model": uri, "recipe": src["recipe"], "run_id": name, "publish": True},
            "note": f"{uri} (sha256 {c['key']}) attempt {attempt}/{max_attempts}",
        })
    return {"triggers": triggers, "alerts": alerts, "waiting": waiting, "done": done}


def alerted_keys() -> set[str]:
    raw = settings.variable(ALERTED_VAR, [], json_=True)
    return set(raw if isinstance(raw, list) else [])


def plan_from_s3(hook, src: dict, ti) -> dict:
    listing = hook.iter_file_metadata(_base(src["prefix"]), src["bucket"])
    ckpts = complete_checkpoints(listing, src["prefix"])
    out = plan(ckpts, src, dr_counter(ti), alerted_keys())
    out["checkpoints"] = len(ckpts)
    return out


def has_work(files: list, **context) -> bool:
    """S3KeySensor check_fn: true when some complete checkpoint is to be triggered or alerted."""
    src = source(context.get("params"))
    p = plan_from_s3(context["task"].hook, src, context["ti"])
    print(f"{len(files)} marker(s), {p['checkpoints']} complete checkpoint(s): {len(p['triggers'])} to trigger, "
          f"{len(p['alerts'])} to alert, {len(p['waiting'])} in flight, {len(p['done'])} done")
    return bool(p["triggers"] or p["alerts"])


with DAG(
    dag_id="birdbone_nightly",
    description="Nightly: compress and publish new checkpoints from S3, exactly once each, with retries",
    schedule="0 2 * * *",
    catchup=False,
    max_active_runs=1,
    tags=["birdbone"],
    doc_md=__doc__,
    user_defined_macros={"nightly_marker_glob": marker_glob, "nightly_aws_conn_id": aws_conn_id},
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), **signals.TASK_CALLBACKS},
    **signals.RUN_CALLBACKS,
    params={
        "bucket": Param("", type=["string", "null"], title="Bucket",
                        description="S3 bucket of checkpoints; empty = Variable birdbone_nightly_bucket"),
        "prefix": Param("", type=["string", "null"], title="Prefix",
                        description="key prefix; empty = Variable birdbone_nightly_prefix"),
        "recipe": Param("", type=["string", "null"], title="Recipe",
                        description="recipe YAML; empty = Variable birdbone_nightly_recipe (else the default)"),
    },
) as dag:

    wait = S3KeySensor(
        task_id="wait_for_checkpoint",
        bucket_key="{{ nightly_marker_glob(params) }}",
        wildcard_match=True,
        check_fn=has_work,
        aws_conn_id="{{ nightly_aws_conn_id() }}",
        mode="reschedule",
        poke_interval=SENSOR_POKE.total_seconds(),
        timeout=SENSOR_TIMEOUT.total_seconds(),
        soft_fail=True,                    # nothing new tonight: the run is skipped, not failed
    )

    @task
    def plan_runs(params=None, ti=None) -> list[dict]:
        """The compress runs to trigger (return value, mapped over) and, as XCom "alerts", the exhausted
        checkpoints to alert."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        src = source(params)
        p = plan_from_s3(S3Hook(aws_conn_id=src["aws_conn_id"]), src, ti)
        for t in p["triggers"]:
            print(f"trigger {t['trigger_run_id']}: {t['note']}")
        for a in p["alerts"]:
            print(f"exhausted: {a['checkpoint']} ({a['attempts']} failed attempts)")
        for uri in p["waiting"]:
            print(f"in flight: {uri}")
        ti.xcom_push(key="alerts", value=p["alerts"])
        return p["triggers"]

    @task
    def alert_exhausted(**context) -> int:
        """Alert once per checkpoint whose every attempt failed (recorded in Variable birdbone_nightly_alerted)."""
        from operators import signals

        alerts = context["ti"].xcom_pull(task_ids="plan_runs", key="alerts") or []
        if not alerts:
            return 0
        keys = alerted_keys()
        for a in alerts:
            if a["key"] in keys:
                continue
            signals.alert(context, f"checkpoint {a['checkpoint']}: all {a['attempts']} birdbone_compress "
                                   f"attempts failed (last: {a['last_run_id']})",
                          alert=ALERT_NAME, key=a["key"], checkpoint=a["checkpoint"])
            keys.add(a["key"])
            settings.set_variable(ALERTED_VAR, sorted(keys), json_=True)
        return len(alerts)

    planned = plan_runs()
    wait >> planned
    TriggerDagRunOperator.partial(
        task_id="trigger_compress", trigger_dag_id=COMPRESS_DAG_ID, skip_when_already_exists=True,
        wait_for_completion=False, openlineage_inject_parent_info=False,
    ).expand_kwargs(planned)
    planned >> alert_exhausted()
