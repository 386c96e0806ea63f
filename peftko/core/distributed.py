"""Data-parallel runs (`torchrun`, `accelerate launch --multi_gpu`): who writes, and where ranks wait.

A launcher starts one process (rank) per GPU with RANK, WORLD_SIZE and LOCAL_RANK set.
transformers' Trainer shards the batches and all-reduces the gradients; what peftko adds here:

- Rank 0 alone prints and writes: the output lock, the dataset cache, run.json, metrics.jsonl,
  checkpoints (each rank adds only its RNG state to the one checkpoint folder) and the adapter.
  The other ranks' console is silenced at the file-descriptor level, so library warnings and
  progress bars are not printed N times; an unexpected traceback still reaches the console.
- What rank 0 decides (a refusal, a staging folder's name) reaches every rank (`on_main`), so all
  ranks stop together with rank 0's exit code instead of waiting on a rank that has left.
- These control messages go over their own gloo group, which works beside NCCL and on the CPU.

A single process (no launcher) takes none of these paths: every function is then a plain call.
Every rank must share the output folder and PEFTKO_HOME (one machine, or a shared filesystem).
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

from peftko.core.errors import Interrupted, UserError

# Rank 0 may build the dataset cache of a large corpus while the others wait at a barrier, so the
# control group waits long; a rank that dies ends the run at once anyway (the launcher stops all).
CONTROL_TIMEOUT = datetime.timedelta(hours=6)
# Launchers that start one process per GPU set these; FSDP and DeepSpeed set the last two.
_FSDP_ENV, _DEEPSPEED_ENV = "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"

_control = None  # the gloo process group, once set up
_quiet = False


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def refuse_sharding() -> None:
    """FSDP / DeepSpeed launches are refused before anything is loaded (docs: multi-GPU)."""
    def on(name):
        return os.environ.get(name, "false").lower() in ("1", "true", "yes")

    if on(_FSDP_ENV):
        raise UserError(
            "FSDP (accelerate launch --use_fsdp) is not supported: peftko measures bits per character and "
            "writes checkpoints and the adapter through the unwrapped model, whose weights FSDP splits "
            "across the ranks, and its marker rows (peft trainable_token_indices) would need FSDP's "
            "use_orig_params=True, which peftko neither sets nor tests (its 4-bit base already stores "
            "NF4 in the compute dtype, as FSDP needs). Launch data-parallel instead (torchrun "
            "--nproc_per_node N, or accelerate launch --multi_gpu): every card then holds the whole "
            "4-bit base; `--dry-run --num-processes N` gives the memory per card.")
    if on(_DEEPSPEED_ENV):
        raise UserError("DeepSpeed (accelerate launch --use_deepspeed) is not supported; launch data-parallel "
                        "with torchrun --nproc_per_node N or accelerate launch --multi_gpu.")


# What a collective call raises on a rank whose peer process is gone (gloo, NCCL, the TCP store).
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_lost(error: BaseException) -> bool:
    """Whether `error` is this rank's view of another rank that ended (not a failure of its own)."""
    if not active() or not isinstance(error, RuntimeError):
        return False
    kinds = {c.__name__ for c in type(error).__mro__}
    return bool(kinds & {"DistNetworkError"}) or any(text in str(error) for text in _PEER_GONE)


def quiet_other_ranks() -> None:
    """Ranks other than 0 print nothing: stdout and stderr go to /dev/null at the descriptor level
    (C libraries and handlers bound to the old streams included). A crash's traceback still goes
    to the real stderr, marked with the rank, so a failure on one rank is never silent."""
    global _quiet
    if not active() or is_main() or _quiet:
        return
    _quiet = True
    real_stderr = os.fdopen(os.dup(2), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    me = rank()

    def excepthook(kind, value, tb):
        real_stderr.write(f"peftko rank {me}: " + "".join(traceback.format_exception(kind, value, tb)))

    sys.excepthook = excepthook


def setup(device_type: str) -> None:
    """Join the launcher's process group (NCCL on CUDA, gloo on the CPU) and make the gloo group
    for peftko's own messages. The Trainer (through accelerate) uses the group set up here."""
    global _control
    if not active() or _control is not None:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=CONTROL_TIMEOUT)
    _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def barrier() -> None:
    if _control is not None:
        import torch.distributed as dist

        dist.barrier(group=_control)


def broadcast(obj):
    """Rank 0's `obj` on every rank (pickled over the control group)."""
    if _control is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def on_main(fn):
    """fn() on rank 0; its result, or its refusal, on every rank.

    A UserError or a stop (Interrupted) on rank 0 is raised on every rank, so all exit together
    with its code; rank 0 alone prints it. Any other failure is re-raised on rank 0 (its traceback
    says what happened) and ends the other ranks as a UserError, which they do not print.
    """
    if _control is None:
        return fn()
    outcome = ("ok", None)
    failure = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except UserError as e:
            failure, outcome = e, ("user", (str(e), e.exit_code))
        except Interrupted as e:
            failure, outcome = e, ("stop", e.exit_code)
        except BaseException as e:
            failure, outcome = e, ("crash", f"{type(e).__name__} on rank 0")
    kind, value = broadcast(outcome)
    if failure is not None:
        raise failure
    if kind == "user":
        raise _quiet_user_error(*value)
    if kind == "stop":
        raise Interrupted(value - 128, "on rank 0")
    if kind == "crash":
        raise UserError(value)
    return value


def main_first(fn):
    """fn() on rank 0, then on the others: rank 0 builds what the others then reuse (a cache)."""
    if _control is None:
        return fn()
    if is_main():
        result = fn()
        on_main(lambda: None)  # releases the others
        return result
    on_main(lambda: None)  # waits for rank 0 (or raises its refusal)
    return fn()


def _quiet_user_error(message: str, code: int) -> UserError:
    error = UserError(message)
    error.exit_code = code
    return error


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value` (e.g. a received signal's number, 0 for none)."""
    if _control is None:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return int(t.item())


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over every rank (float64, so held-out sums stay exact enough)."""
    if _control is None:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_control)
    return tuple(float(x) for x in t.tolist())


def my_share(blocks):
    """This rank's contiguous share of a list or Dataset of blocks (the shares cover it once)."""
    if _control is None:
        return blocks
    n, size, me = len(blocks), world_size(), rank()
    lo, hi = n * me // size, n * (me + 1) // size
    if hasattr(blocks, "select"):
        return blocks.select(range(lo, hi))
    return blocks[lo:hi]
