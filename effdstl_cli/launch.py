"""The only module that knows submitit and Slurm: executors, the DDP environment, requeue.

Executors:
  debug  in this process, one job after another (live progress; no submitit)
  local  submitit LocalExecutor subprocesses, a bounded queue: at most ``max_parallel`` at once
         (one per GPU when GPUs exist, else one: a job already uses every core)
  slurm  submitit on Slurm: one job per group (a job array per set of jobs with the same
         dependencies, bounded by --array-parallelism), ``afterok`` dependencies, G GPUs = one DDP job

Every job's callable resumes from its run directories, so ``checkpoint()`` only has to resubmit
the same callable: a preempted or timed-out job requeues and continues from its last epoch.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import files as fio
from .errors import EffdstlError
from .fusion import FUSE_MODES, fusion_plan
from .rundir import RunDir
from .studies import Job, Plan, describe_run, run_state

EXECUTORS = ("debug", "local", "slurm")


@dataclass
class LaunchOptions:
    executor: str = "local"
    device: str = "auto"
    tasks: int = 1                    # processes per job (DDP); on GPUs = GPUs per job
    gpus_per_job: int | None = None   # Slurm: default 4 when --partition has GPUs; 0 = CPU job
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    timeout_min: int = 24 * 60
    array_parallelism: int = 16
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    max_parallel: int | None = None   # local: concurrent jobs
    compile: bool = False
    workers: int = 4
    decode: str = "auto"              # folder data: device (nvJPEG) | workers (PIL) | mixed:F | auto (device on CUDA)
    fuse: str = "auto"                # students of one architecture as one fused model: auto | on | off
    wait: bool = True
    skip_bad_images: bool = False     # folder data: leave undecodable files out (counted in final.json)
    poll_s: float = 1.0
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            from .errors import unknown

            raise unknown("executor", self.executor, EXECUTORS)
        decode_share(self.decode)
        if self.fuse not in FUSE_MODES:
            from .errors import unknown

            raise unknown("--fuse mode", self.fuse, FUSE_MODES)
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            from .errors import unknown

            raise unknown("--device", self.device, ("auto", "cpu", "cuda", "cuda:N"))
        if self.max_parallel is not None and int(self.max_parallel) < 1:
            raise EffdstlError(f"--max-parallel must be >= 1 (jobs at once), got {self.max_parallel}")
        for k in ("tasks", "timeout_min", "array_parallelism", "workers"):
            least = 0 if k == "workers" else 1  # --workers 0: the main process reads the images
            if int(getattr(self, k)) < least:
                raise EffdstlError(f"--{k.replace('_', '-')} must be >= {least}, got {getattr(self, k)}")
        if self.gpus_per_job is not None and self.gpus_per_job < 0:
            raise EffdstlError(f"--gpus-per-job must be >= 0, got {self.gpus_per_job}")
        if self.executor != "slurm":
            have = _local_gpus() if (self.gpus_per_job or self.device.startswith("cuda")) else 0  # none asked: no count
            want = self.gpus_per_job or 0
            if want > have:
                raise EffdstlError(f"--gpus-per-job {want} asked for, but this machine has {have} GPU(s); "
                                   "use --executor slurm for a cluster, or fewer GPUs")
            if self.device.startswith("cuda") and have == 0:
                raise EffdstlError("--device cuda asked for, but no CUDA GPU is visible here")

    def world(self) -> int:
        return max(int(self.gpus_per_job or 0), int(self.tasks), 1)

    def backend(self) -> str:
        return "nccl" if (self.gpus_per_job or 0) > 0 or self.device.startswith("cuda") else "gloo"


def _local_gpus() -> int:
    """CUDA GPUs this process sees. Without an NVIDIA (or ROCm) device node there are none, and
    planning (a dry run, status) need not import torch to learn it."""
    if sys.platform.startswith("linux") and not (any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()):
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA build
        return 0


def slurm_available() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# -- the callables that run inside a job ---------------------------------------------------

class TrainJob:
    """A group of runs, trained by ``engine.train_group``; resumable, hence requeue-safe."""

    def __init__(self, runs: list[tuple[dict, str]], env_kw: dict, world: int, backend: str,
                 skip_bad_images: bool = False):
        self.runs, self.env_kw, self.world, self.backend = runs, env_kw, world, backend
        self.skip_bad_images = skip_bad_images
        self.progress = None  # in-process (debug) runs report each epoch through this

    def __call__(self) -> list[dict]:
        from .data import folder
        from .engine import Env, train_group

        folder.SKIP_BAD_IMAGES = bool(getattr(self, "skip_bad_images", False))

        env = Env(**self.env_kw, progress=self.progress, job=_this_job(self.progress is not None))
        rank, world = _init_distributed(self.world, self.backend)
        env.rank, env.world = rank, world
        if rank == 0 and self.progress is None:  # a submitit job: say which one, in its log
            jid = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "?"
            env.log(f"effdstl job {jid}: {len(self.runs)} run(s), {world} process(es), "
                    f"restart {os.environ.get('SLURM_RESTART_COUNT', 0)}")
        if world > 1 and self.backend == "nccl":
            env.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        try:
            while True:
                try:
                    return train_group([(c, Path(d)) for c, d in self.runs], env)
                except fio.LockBusy as busy:
                    if world > 1:  # every rank would have to agree to wait: fail as before
                        raise
                    # Another process (a second sweep of the same study) trains this run: wait for it,
                    # then go again. train_group holds no lock while we wait, and skips what the other
                    # process finished, so every run is trained once and both commands succeed.
                    wait_for_lock(busy, env.log)
        finally:
            if world > 1:
                import torch.distributed as dist

                dist.destroy_process_group()

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        # State lives in the run directories (a checkpoint every epoch): resubmitting is enough.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def wait_for_lock(busy: "fio.LockBusy", log: Callable[[str], None], poll_s: float = 1.0) -> None:
    """Block until the process named by ``busy`` no longer holds that run's lock."""
    h = busy.holder
    log(f"run {busy.path.parent.name} is being trained by pid {h.get('pid')} on {h.get('host')}: "
        "waiting for it (it is not trained twice)")
    lock = fio.RunLock(busy.path.parent)
    while lock.alive():
        time.sleep(poll_s)


class ProbeJob:
    """The FGSM probe of one distilled run (effdstl_cli.attack)."""

    def __init__(self, probe: dict, device: str):
        self.probe, self.device = probe, device

    def __call__(self) -> str:
        from .attack import run_probe

        return str(run_probe(self.probe, device=self.device))

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _init_distributed(world: int, backend: str) -> tuple[int, int]:
    """One process per task via submitit's TorchDistributedEnvironment (Slurm or local)."""
    if world <= 1:
        return 0, 1
    import submitit
    import torch
    import torch.distributed as dist

    denv = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if backend == "nccl":
        torch.cuda.set_device(denv.local_rank)
    dist.init_process_group(backend=backend, rank=denv.rank, world_size=denv.world_size)
    return denv.rank, denv.world_size


# -- launching a plan ----------------------------------------------------------------------

Report = Callable[[str], None]


def decode_share(mode: str) -> tuple[bool | None, float]:
    """``--decode`` -> (Env.gpu_decode, Env.cpu_share): parsed by the batch stream, which uses it."""
    from .data.spec import StreamOptions  # torch-free: validate() parses --decode for a dry run too

    return StreamOptions.parse_decode(mode)


def _env_kw(opts: LaunchOptions) -> dict:
    gpu_decode, share = decode_share(opts.decode)
    return {"device": opts.device, "compile": opts.compile, "workers": opts.workers,
            "gpu_decode": gpu_decode, "cpu_share": share, "fuse": opts.fuse}


def _callable(job: Job, opts: LaunchOptions):
    if job.work == "probe":
        return ProbeJob(job.probe, opts.device)
    runs = [(c, str(d)) for c, d in job.runs]
    return TrainJob(runs, _env_kw(opts), opts.world(), opts.backend(), opts.skip_bad_images)


def _queued_elsewhere(job: Job) -> str | None:
    """A Slurm job id recorded for this job's runs that squeue still lists (pending/running)."""
    if job.work == "probe" or not shutil.which("squeue"):
        return None
    for _, d in job.runs:
        info = Path(d) / "job.json"
        if info.exists():
            try:
                rec = fio.read_json(info)
            except Exception:  # noqa: BLE001
                continue
            jid = str(rec.get("job_id", ""))
            if jid and rec.get("executor") == "slurm" and _squeue_lists(jid):
                return jid
    return None


def _squeue_lists(jid: str) -> bool:
    """squeue lists the job (pending or running). The full id: an array task (123_4) is listed only
    while that task is queued/running."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def _this_job(debug: bool) -> dict:
    """This process's job as job.json records it (the same id `_record` writes at submission)."""
    rec = {"host": socket.gethostname()}
    if debug:
        return {"job_id": f"debug-{os.getpid()}", "executor": "debug", **rec}
    try:
        import submitit

        jid = submitit.JobEnvironment().job_id
    except Exception:  # noqa: BLE001 - not inside a submitit job: nothing to name
        return {}
    return {"job_id": str(jid), "executor": "slurm" if os.environ.get("SLURM_JOB_ID") else "local", **rec}


def _record(job: Job, job_id: str, executor: str) -> None:
    """job.json of each run this job will train: never over a finished run or one another live
    process trains (that run keeps the id of the job that really trains it)."""
    for _, d in job.runs:
        run = RunDir(d)
        deadline = time.time() + 0.5  # a holder killed a moment ago (kill -9, then the same command) is gone by then
        while run.state() == "running" and time.time() < deadline:
            time.sleep(0.1)
        if run.state() in ("done", "damaged", "failed", "running") or _job_alive(run.job):
            continue
        Path(d).mkdir(parents=True, exist_ok=True)
        fio.write_json(Path(d) / "job.json", {"job_id": job_id, "executor": executor, "job": job.name,
                                              "host": socket.gethostname(), "submitted_at": time.time()})


def _job_alive(rec: dict) -> bool:
    """Whether the job a run's job.json names is still alive: it was submitted first and will train
    the run (a second command that waits for it must not put its own id there). Local and debug jobs
    are processes of this host (their id is a pid), Slurm jobs are asked of squeue."""
    jid, executor = str(rec.get("job_id", "")), rec.get("executor")
    if executor in ("local", "debug"):
        pid = jid.removeprefix("debug-")
        return (pid.isdigit() and rec.get("host", socket.gethostname()) == socket.gethostname()
                and int(pid) != os.getpid() and fio._alive(int(pid)))
    return executor == "slurm" and bool(jid) and bool(shutil.which("squeue")) and _squeue_lists(jid)


def _result(sj) -> Any:
    """A submitted job's return value (task 0's for a multi-task DDP job: all ranks return the same)."""
    res = sj.results()
    return res[0] if res else None


def job_error(exc: BaseException) -> str:
    """One line for a failed submitit job: the last line of the job's own exception (not
    submitit's wrapper text, whose last line is a log path), without the EffdstlError prefix."""
    text = str(exc).strip()
    parts = text.split("----------------------")  # FailedJobError: header / job trace / log paths
    lines = [ln.strip() for ln in (parts[1] if len(parts) >= 3 else text).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1] if len(parts) >= 3 else lines[0]
    import re

    m = re.match(r"(effdstl_cli\.\w+\.)?(EffdstlError|BadImage|DamagedRun|LockBusy): (.*)", last)
    return m.group(3) if m else last


def todo(plan: Plan) -> list[Job]:
    return [j for j in plan.jobs if j.state() != "done"]


def apply_study_defaults(plan: Plan, opts: LaunchOptions) -> None:
    """On Slurm, a study's own ``slurm:`` block sets the defaults the command line did not:
    the paper-scale studies ask for ``gpus_per_job: 4`` (ImageNet: one 4-GPU DDP job per group),
    the CPU-sized digits studies for nothing. Other executors run where they are told."""
    if opts.executor != "slurm":
        return
    s = plan.study.get("slurm") or {}
    if opts.gpus_per_job is None and s.get("gpus_per_job") is not None:
        opts.gpus_per_job = int(s["gpus_per_job"])
    if opts.partition is None and s.get("partition"):
        opts.partition = str(s["partition"])


def preflight(plan: Plan, opts: LaunchOptions) -> None:
    """What must hold before a real launch (not a dry run): a Slurm launch needs a cluster that answers.

    Callers run it before showing progress, so a missing cluster is one line and exit 2."""
    if opts.executor == "slurm" and todo(plan) and not slurm_available():
        raise EffdstlError("--executor slurm: no Slurm cluster answers here (sbatch/sinfo); use "
                           "--executor local, or start a local one with scripts/local-slurm.sh start")


def refuse_damaged(plan: Plan) -> None:
    """A damaged run (rundir: final.json or a file it seals is unreadable, missing or altered) is
    never used and never silently retrained: one line naming it and the file, and the cure."""
    damaged = [RunDir(d) for j in plan.jobs for _, d in j.runs if run_state(d) == "damaged"]
    if damaged:
        first = damaged[0]
        more = (f" (and {len(damaged) - 1} more: {', '.join(r.name for r in damaged[1:6])})"
                if len(damaged) > 1 else "")
        raise EffdstlError(f"run {first.name} of study '{plan.study['name']}' is damaged: {first.problem()}{more}; "
                           f"retrain it: add `--rerun {first.name}` to this command (or delete {first.path})")


def launch(plan: Plan, opts: LaunchOptions, report: Report = print,
           on_poll: Callable[[], None] | None = None) -> dict:
    """Run or submit every job of the plan that is not done. Returns {job name: outcome}."""
    opts.validate()
    pending = todo(plan)
    if not pending:
        report(f"nothing to do: all {len(plan.jobs)} jobs of study '{plan.study['name']}' are done")
        return {}
    refuse_damaged(plan)
    failed_runs = [d for j in pending for _, d in j.runs if run_state(d) == "failed"]
    if failed_runs:
        report(f"{len(failed_runs)} run(s) failed earlier and are kept as failed (see failed.json; "
               "`effdstl status` lists them; delete failed.json to retry)")
        pending = [j for j in pending if j.state() != "failed"]
        if not pending:
            return {}
    preflight(plan, opts)
    fio.write_yaml(plan.study_dir / "study.yaml", plan.study)
    if opts.executor == "debug":
        return _run_debug(plan, pending, opts, report, on_poll)
    if opts.executor == "slurm":
        return _run_slurm(plan, pending, opts, report, on_poll)
    return _run_local(plan, pending, opts, report, on_poll)


def _run_debug(plan: Plan, pending: list[Job], opts: LaunchOptions, report: Report, on_poll) -> dict:
    out = {}
    for job in pending:
        report(f"running {job.name} ({len(job.runs)} runs) in this process")
        fn = _callable(job, opts)
        _record(job, f"debug-{os.getpid()}", "debug")
        if on_poll and isinstance(fn, TrainJob):
            fn.progress = lambda event, info: on_poll()
        out[job.name] = fn()
    return out


def _log_folder(plan: Plan) -> Path:
    return plan.study_dir / "logs" / "%j"


def _tidy_logs(plan: Plan) -> None:
    """LocalExecutor also makes its folder template literally (logs/%j): drop it while empty."""
    try:
        (plan.study_dir / "logs" / "%j").rmdir()
    except OSError:
        pass


def _local_slots(opts: LaunchOptions) -> list[list[int] | None]:
    """Concurrent local jobs: one per group of ``gpus_per_job`` GPUs, else one CPU slot (a job
    already uses every core); ``--max-parallel`` caps GPU slots or sets the number of CPU slots."""
    gpus = _local_gpus() if opts.device != "cpu" else 0
    per = max(int(opts.gpus_per_job or 0), 1)
    if gpus:
        slots: list[list[int] | None] = [list(range(i * per, (i + 1) * per)) for i in range(gpus // per)]
        return slots[:opts.max_parallel] if opts.max_parallel else slots
    return [None] * (opts.max_parallel or 1)


def _run_local(plan: Plan, pending: list[Job], opts: LaunchOptions, report: Report, on_poll) -> dict:
    """A bounded queue over submitit's LocalExecutor (which has none of its own).

    Interrupted (Ctrl-C, or SIGTERM turned into KeyboardInterrupt by the CLI), it cancels the jobs it
    started and waits for them to stop before the interrupt goes on: no training job outlives the
    command (docs/RELIABILITY.md, "Ctrl-C and kill")."""
    running: dict[str, tuple[Any, Any]] = {}
    try:
        return _local_queue(plan, pending, opts, report, on_poll, running)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        # Ctrl-C reached the jobs too (one process group): give them a grace; `kill` reached the CLI alone
        raise Interrupted(_cancel_local(running, grace_s=2.0 if signum == 2 else 0.0), signum) from None
    finally:
        _tidy_logs(plan)  # reading a job's results makes the folder template again


class Interrupted(KeyboardInterrupt):
    """The local queue was interrupted (``signum``); ``jobs``: the local jobs it cancelled and saw stop."""

    def __init__(self, jobs: list[str], signum: int = 2):
        super().__init__(jobs)
        self.jobs, self.signum = jobs, signum


def _cancel_local(running: dict[str, tuple[Any, Any]], grace_s: float = 2.0, stop_s: float = 30.0) -> list[str]:
    """Stop every started local job: a Ctrl-C in a terminal has already reached them (one process
    group), so first a short grace (none after a `kill` of the CLI alone); then SIGINT to the job's controller (submitit's cancel: it
    interrupts the task, whose engine releases its locks), and SIGKILL past ``stop_s``."""
    import signal

    procs = {name: sj._process for name, (sj, _) in running.items() if getattr(sj, "_process", None) is not None}
    deadline = time.time() + grace_s
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(0.05)
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.time() + stop_s
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(0.05)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    return [f"{name} (job {sj.job_id})" for name, (sj, _) in running.items()]


def _local_queue(plan: Plan, pending: list[Job], opts: LaunchOptions, report: Report, on_poll,
                 running: dict[str, tuple[Any, Any]]) -> dict:
    import submitit

    free = _local_slots(opts)
    waiting = list(pending)
    done_ok = {j.name for j in plan.jobs if j.state() == "done"}
    out: dict[str, Any] = {}
    while waiting or running:
        for name, (sj, slot) in list(running.items()):
            if sj.done():
                del running[name]
                free.append(slot)
                try:
                    out[name] = _result(sj)
                    done_ok.add(name)
                except Exception as exc:  # noqa: BLE001 - report the job's error, go on with others
                    out[name] = f"failed: {job_error(exc)}"
                    report(f"job {name} failed: {out[name]}  (log: {sj.paths.stderr})")
        ready = [j for j in waiting if all(d in done_ok for d in j.deps)]
        blocked = [j for j in waiting if any(d in out and d not in done_ok for d in j.deps)]
        for j in blocked:
            waiting.remove(j)
            out[j.name] = "skipped: a dependency failed"
        while ready and free:
            job = ready.pop(0)
            waiting.remove(job)
            slot = free.pop(0)
            ex = submitit.LocalExecutor(folder=str(_log_folder(plan)))
            params = {"timeout_min": opts.timeout_min, "tasks_per_node": opts.world() if job.work == "train" else 1,
                      "nodes": 1}
            if slot is not None:
                params.update(visible_gpus=slot, gpus_per_node=len(slot))
            ex.update_parameters(**params)
            with _quiet_controller(plan):
                sj = ex.submit(_callable(job, opts))
            _tidy_logs(plan)
            _record(job, str(sj.job_id), "local")
            running[job.name] = (sj, slot)
            report(f"started {job.name} ({len(job.runs)} runs) as local job {sj.job_id}")
        if not ready and not running and waiting:
            for j in waiting:
                out[j.name] = "skipped: a dependency did not finish"
            break
        if on_poll:
            on_poll()
        time.sleep(opts.poll_s)
    if on_poll:
        on_poll()
    return out


@contextmanager
def _quiet_controller(plan: Plan):
    """submitit's local controller inherits the CLI's stderr, so an interrupt there printed its
    KeyboardInterrupt traceback into the user's terminal: it writes to logs/controller.err instead
    (the jobs' own output goes to their log folders as before)."""
    log = plan.study_dir / "logs" / "controller.err"
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _job_resources(opts: LaunchOptions, work: str = "train") -> tuple[int, int]:
    """(processes, GPUs) of one job: a training job is one DDP job over G GPUs; a probe is 1 process."""
    gpus = int(opts.gpus_per_job or 0)
    return (opts.world(), gpus) if work == "train" else (1, min(gpus, 1))


def slurm_parameters(plan: Plan, opts: LaunchOptions, dep_ids: list[str] | None = None,
                     work: str = "train") -> dict[str, Any]:
    """submitit AutoExecutor parameters of one array of jobs (a training job on G GPUs = one DDP job)."""
    tasks, gpus = _job_resources(opts, work)
    params: dict[str, Any] = {
        "timeout_min": opts.timeout_min, "nodes": 1, "tasks_per_node": tasks,
        "cpus_per_task": opts.cpus_per_task or (8 if gpus else 1),
        "slurm_array_parallelism": opts.array_parallelism, "slurm_signal_delay_s": 120,
        "name": f"effdstl-{plan.study['name']}",
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if opts.partition:
        params["slurm_partition"] = opts.partition
    extra = {}
    if opts.account:
        extra["account"] = opts.account
    if opts.qos:
        extra["qos"] = opts.qos
    if dep_ids:
        extra["dependency"] = "afterok:" + ":".join(dep_ids)
        extra["kill-on-invalid-dep"] = "yes"
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def _run_slurm(plan: Plan, pending: list[Job], opts: LaunchOptions, report: Report, on_poll) -> dict:
    import submitit

    ids: dict[str, str] = {}
    handles: dict[str, Any] = {}
    for job in pending:
        queued = _queued_elsewhere(job)
        if queued:
            ids[job.name] = queued
            report(f"{job.name}: already queued as Slurm job {queued}; not submitting it again")
    to_submit = [j for j in pending if j.name not in ids]
    # Jobs of one work (train | probe) with the same dependency set go out together as one array.
    by_deps: dict[tuple, list[Job]] = {}
    order = {j.name: i for i, j in enumerate(plan.jobs)}
    for j in sorted(to_submit, key=lambda j: order[j.name]):
        by_deps.setdefault((j.work, tuple(j.deps)), []).append(j)
    for (work, deps), jobs in by_deps.items():
        ex = submitit.AutoExecutor(folder=str(_log_folder(plan)), cluster="slurm")
        dep_ids = [ids[d] for d in deps if d in ids]
        ex.update_parameters(**slurm_parameters(plan, opts, dep_ids, work))
        with ex.batch():
            subs = [ex.submit(_callable(j, opts)) for j in jobs]
        for j, sj in zip(jobs, subs):
            ids[j.name] = str(sj.job_id)
            handles[j.name] = sj
            _record(j, str(sj.job_id), "slurm")
            report(f"submitted {j.name} ({len(j.runs)} runs) as Slurm job {sj.job_id}"
                   + (f" after {','.join(deps)}" if dep_ids else ""))
    if not opts.wait:
        return ids
    out: dict[str, Any] = {}
    while len(out) < len(handles):
        for name, sj in handles.items():
            if name in out or not sj.done():
                continue
            try:
                out[name] = _result(sj)
            except Exception as exc:  # noqa: BLE001
                out[name] = f"failed: {job_error(exc)}"
                report(f"job {name} ({sj.job_id}) failed: {out[name]}")
        if on_poll:
            on_poll()
        time.sleep(opts.poll_s)
    # Jobs queued by an earlier invocation: wait on their run directories.
    while any(Job(n, "train", plan.job(n).runs).state() in ("pending", "running", "partial")
              and _queued_elsewhere(plan.job(n)) for n in ids if n not in handles):
        if on_poll:
            on_poll()
        time.sleep(opts.poll_s)
    return out


def dry_run_lines(plan: Plan, opts: LaunchOptions, verbose: bool = False) -> list[str]:
    """What ``launch`` would do, without touching data or a cluster (``verbose``: every run of
    every job, not the first three)."""
    world, gpus = opts.world(), int(opts.gpus_per_job or 0)
    lines = [f"study {plan.study['name']} ({plan.study['kind']}, dataset {plan.study['dataset']}): "
             f"{len(plan.jobs)} jobs, {sum(len(j.runs) for j in plan.jobs)} runs -> {plan.study_dir}",
             f"executor {opts.executor}: {world} process(es) per job"
             + (f", {gpus} GPU(s) per job" if gpus else ", CPU") + f", backend {opts.backend() if world > 1 else 'none (1 process)'}"
             + (f", partition {opts.partition}" if opts.partition else "")
             + (f", array parallelism {opts.array_parallelism}" if opts.executor == "slurm" else "")]
    if str(plan.study["dataset"]).split(":")[0] in ("folder", "imagenet"):
        from .data.spec import StreamOptions

        lines.append(f"images: {StreamOptions.from_decode(opts.decode, opts.workers).describe()} (--decode {opts.decode})")
    job_device = "cuda" if (gpus or opts.device.startswith("cuda")
                            or (opts.device == "auto" and opts.executor != "slurm" and _local_gpus())) else "cpu"
    tl = []
    for name, t in (plan.study.get("teachers") or {}).items():
        # a teacher's epochs default to the study's teacher_schedule (as the planner resolves them)
        ep = t.get("epochs", (plan.study.get("teacher_schedule") or {}).get("epochs", "?"))
        src = "pretrained" if t.get("pretrained") else (f"ckpt {t['ckpt']}" if t.get("ckpt") else f"trained here, {ep} ep")
        tl.append(f"{name}={t['model']} ({src})")
    if tl:
        lines.append("teachers: " + ", ".join(tl))
    if opts.executor == "slurm":
        p = slurm_parameters(plan, opts)
        lines.append(f"sbatch per training job: --nodes {p['nodes']} --ntasks-per-node {p['tasks_per_node']} "
                     + (f"--gpus-per-node {p['gpus_per_node']} " if p.get("gpus_per_node") else "")
                     + f"--cpus-per-task {p['cpus_per_task']} --time {p['timeout_min']}"
                     + (f" --partition {opts.partition}" if opts.partition else "")
                     + f"; one array per dependency set, --array=0-N%{opts.array_parallelism}; requeue on preemption")

    for j in plan.jobs:
        state = j.state()
        procs, jg = _job_resources(opts, j.work)
        lines.append(f"  {j.name:<18} {j.work:<6} runs={len(j.runs):<3} gpus={jg} procs={procs} "
                     f"deps={','.join(j.deps) or '-':<28} [{state}{' -> skip' if state == 'done' else ''}]")
        if j.work == "train":
            for ln in fusion_plan([c for c, _ in j.runs], job_device, opts.fuse):
                lines.append(f"      fuse --{opts.fuse}: {ln}")
        shown = j.runs if verbose else j.runs[:3]
        for c, d in shown if j.work == "train" else []:
            lines.append(f"      {d.name}  {c['model']:<18} bs {c['batch_size']}{' no-aug' if c.get('augment') is False else ''}  ({c['meta']['label']})  "
                         f"{describe_run(c)}")
        if j.work == "train" and len(j.runs) > len(shown):
            lines.append(f"      ... and {len(j.runs) - len(shown)} more runs (--verbose lists every run)")
    # a dry run imports no torch (planning stays fast), so what only a forward can tell is left to the launch
    lines.append("not checked by a dry run: each model on the data's shape (a launch runs one CPU forward of "
                 "every model first, and stops in one line before any job when one cannot run)")
    return lines
