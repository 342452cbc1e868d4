"""`birdbone publish RUN` and `birdbone pull RUN_ID -o DIR`: a run's artifacts to and from S3-backed DVC.

Imports stay inside the handlers: the parser is built on every `birdbone` call."""
from __future__ import annotations

import json
from pathlib import Path


def _cmd_publish(a) -> int:
    if not a.enabled:
        print("publishing not requested (--enabled false): nothing to do")
        return 0
    from birdbone_core.ops.artifacts import publish

    r = publish(Path(a.run), a.remote, a.endpoint_url, a.run_id, jobs=a.jobs)
    if a.json:
        print(json.dumps({"run_id": r.run_id, "tracked": r.tracked, "pushed": r.pushed,
                          "index_uploaded": r.index_uploaded, "index": r.index_url}))
    elif r.pushed == 0 and not r.index_uploaded:
        print(f"already done: {r.run_id} is published at {r.index_url}, nothing new to push")
    else:
        print(f"published {r.run_id}: {len(r.tracked)} artifacts tracked, {r.pushed} new objects pushed, "
              f"index {r.index_url}")
    return 0


def _cmd_pull(a) -> int:
    from birdbone_core.ops.artifacts import pull

    r = pull(a.run_id, Path(a.out), a.remote, a.endpoint_url, model=a.model, jobs=a.jobs)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"pulled {r['run_id']} into {r['dir']} ({r['fetched']} objects fetched): {', '.join(r['outputs'])}")
    return 0


def _truth(v: str) -> bool:
    t = str(v).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", "none", ""):
        return False
    raise ValueError(v)


def _remote_flags(p) -> None:
    p.add_argument("--remote", help="s3://BUCKET/PREFIX or a local path (default: env BIRDBONE_DVC_REMOTE)")
    p.add_argument("--endpoint-url", help="S3 endpoint for MinIO & co. (default: env BIRDBONE_S3_ENDPOINT); "
                                          "credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    p.add_argument("--jobs", type=int, default=4, help="parallel transfers")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_commands(sub) -> None:
    p = sub.add_parser("publish", help="track a run's artifacts with DVC and push what is new to the S3 remote")
    p.add_argument("run")
    p.add_argument("--run-id", help="name in the remote (default: env BIRDBONE_RUN_ID or the directory name)")
    # lets an orchestrator keep one task per wave and switch publishing per run (`--enabled={{ params.publish }}`)
    p.add_argument("--enabled", type=_truth, default=True, metavar="BOOL",
                   help="false: do nothing (default true)")
    _remote_flags(p)
    p.set_defaults(fn=_cmd_publish)

    q = sub.add_parser("pull", help="restore a published run (ledger, models, metrics) into a new directory")
    q.add_argument("run_id")
    q.add_argument("-o", "--out", required=True, help="directory to create")
    q.add_argument("--model", help="local copy of the base model (if the published path does not exist here)")
    _remote_flags(q)
    q.set_defaults(fn=_cmd_pull)
