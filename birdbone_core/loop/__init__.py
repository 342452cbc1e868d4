"""The adaptive loop, step by step: prepare, then per wave prune -> heal -> regrow -> evaluate -> decide,
then rollback (when the stop-loss says so) and finish. Each step is one `birdbone` command on a run
directory; `birdbone run` chains them in one process. See layout.py for the files each step writes."""
