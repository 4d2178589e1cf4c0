"""Device-side timing on CUDA: per-iteration CUDA events, eager or around a CUDA-graph replay.

Why two variants. ``TorchRunner.timed_call`` records an event pair around one eager forward. On
a GPU that executes the model faster than Python and the dispatcher can launch its kernels
(batch 1, small models: ResNet-50 at batch 1 issues ~160 launches of ~5-15 us each), the stream
runs dry between kernels and the event pair measures the *launch rate*, not the GPU. That number
is real (it is what an eager PyTorch user waits for) but it moves with the CPU, the Python
version and the dispatcher, not with the model's kernels.

trtexec's "GPU Compute Time" is the event time of one ``enqueueV3`` (optionally captured in a CUDA
graph with ``--useCudaGraph``): the whole inference is one launch, so the events bracket GPU work
only. The torch equivalent is to capture the forward once in a ``torch.cuda.CUDAGraph`` and time
each ``replay()`` between events: one launch per inference, kernels back to back on the device.
That is what :func:`graph_timed_call` does. Its samples are labelled ``cuda-graph`` so a baseline
recorded with eager events is never compared with one recorded from graph replays.

Capture can fail (ops that synchronise with the host, data-dependent shapes, CPU fallbacks);
:func:`timed_call` then falls back to eager events and says so in ``TimedCall.note``.
"""
from __future__ import annotations

from typing import Any, Callable

from qatcheck.timing import TimedCall

#: clock labels (LatencyStats.clock); a latency baseline is only comparable under the same clock
EAGER_CLOCK = "cuda-events"
GRAPH_CLOCK = "cuda-graph"
CUDA_GRAPH_CHOICES = ("auto", "on", "off")
#: why a slowdown timed with eager events after a failed capture cannot gate a merge. Measured on
#: an H200: a ModelOpt fake-quant model (its quantizers break capture) read x0.53 .. x1.40 between
#: two clean runs of the same process setup, with the machine-speed probe at x1.00 - the eager
#: events time how fast Python and the dispatcher launch its hundreds of small kernels.
HOST_BOUND = ("CUDA-graph capture failed, so it was timed with eager CUDA events: the figure is the "
              "host's kernel-launch rate, which moved x0.53..x1.40 between clean runs on an H200 - make "
              "the forward capturable (no host synchronisation inside it) to gate its latency")


def eager_timed_call(fn: Callable[[], Any]) -> TimedCall:
    """One event pair around each eager call; synchronises on the end event."""
    import torch

    times: list[float] = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> None:
        with torch.inference_mode():
            start.record()
            fn()
            end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return TimedCall(run, times, clock=EAGER_CLOCK)


def capture_graph(fn: Callable[[], Any], warmup_iters: int = 3):
    """Capture ``fn`` (which reads static input tensors) into a CUDA graph.

    Warm-up runs on a side stream first, as PyTorch's graph docs require (cuDNN/cuBLAS handles,
    autotuning and lazy allocations must happen outside capture). Returns (graph, static outputs).
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(max(1, warmup_iters)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def graph_timed_call(fn: Callable[[], Any], warmup_iters: int = 3) -> TimedCall:
    """One event pair around each replay of ``fn`` captured as a CUDA graph (trtexec-like GPU
    compute time). Raises whatever capture raises; :func:`timed_call` handles the fallback."""
    import torch

    graph, _out = capture_graph(fn, warmup_iters)
    times: list[float] = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> None:  # events and replay on the caller's current stream
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    call = TimedCall(run, times, clock=GRAPH_CLOCK)
    # keep the graph (and its memory pool) alive with the call - and ``fn`` with the static input
    # tensors it closes over: the graph replays from their addresses, so freeing them would make
    # each replay read memory the allocator has handed to something else (or given back)
    call.graph, call.fn = graph, fn
    return call


def timed_call(fn: Callable[[], Any], cuda_graph: str = "auto") -> TimedCall:
    """The timed call for a CUDA forward ``fn``.

    ``cuda_graph``: ``off`` eager events; ``on`` graph replay, failing if capture fails; ``auto``
    graph replay, falling back to eager events (with a note) when capture fails.
    """
    if cuda_graph not in CUDA_GRAPH_CHOICES:
        raise ValueError(f"cuda_graph must be one of {', '.join(CUDA_GRAPH_CHOICES)}; got {cuda_graph!r}")
    if cuda_graph == "off":
        return eager_timed_call(fn)
    try:
        return graph_timed_call(fn)
    except Exception as exc:
        if cuda_graph == "on":
            raise RuntimeError(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                               "time without graphs (--qatcheck-cuda-graph off)") from exc
        import torch

        torch.cuda.synchronize()
        call = eager_timed_call(fn)
        reason = " ".join(str(exc).split())[:160]  # one line: it goes into a table note
        call.note = (f"CUDA graph capture failed ({type(exc).__name__}: {reason}); timed with "
                     "eager CUDA events, which include kernel-launch gaps")
        call.host_bound = HOST_BOUND
        return call
