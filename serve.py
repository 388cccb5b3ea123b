"""A local web page and JSON API that score photos with a trained TANet (1..10 scale).

    python serve.py --path_to_model_weight SRCC_758_LCC_765.pth      # then open the printed URL

Needs ``pip install -r requirements-deploy.txt``. See docs/serve.md for the page and the API.
Exit status: 0 after Ctrl-C, 2 for a usage error (bad option, weights, missing packages, port taken).
"""
from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
from collections.abc import Sequence

import torch

import option
from helpers.console import one_line, safe_text, warnings_as_lines
from helpers.download import DownloadError
from helpers.runtime import ALLOCATORS, AMP_MODES, tune_cpu_allocator, usable_cpus
from scoring import NO_WEIGHTS_HELP, Scorer, ScoringWarning

PROG = "serve.py"
EXIT_OK, EXIT_USAGE = 0, 2
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?)?\s*$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """A size in bytes: ``26214400``, ``25M`` / ``25MB`` / ``25MiB`` (powers of 1024), ``K`` and ``G`` alike."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 26214400 or 25M, got {text!r}")
    unit = (match.group(2) or " ")[0].upper()
    value = int(match.group(1)) * {" ": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def _count(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {value}")
    return value


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def served_hosts(host: str) -> tuple[tuple[str, ...], bool]:
    """The Host header names a server listening on ``host`` answers to besides 127.0.0.1, localhost and
    ::1 (``host`` itself; for every address, the machine's names), and whether any IP address is one too
    (listening on every address: the page is opened by one of the machine's addresses)."""
    if host not in ("0.0.0.0", "::", ""):
        return (host,), False
    return tuple({socket.gethostname(), socket.getfqdn()}), True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a local web page and JSON API that score photos "
                                                       "with a trained TANet on the 1..10 scale.")
    option.add_checkpoint_options(p.add_argument_group("weights"))
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
                        "network)")
    s.add_argument("--port", type=port_number, default=8000, help="port, 0..65535 (default: 8000; 0: any free port)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max_file_bytes", type=byte_size, default=25 << 20,
                        help="largest file accepted, e.g. 25M (default: 25 MiB); a larger one gets an error")
    limits.add_argument("--max_files", type=_count(1), default=8, help="files per request (default: 8)")
    limits.add_argument("--slots", type=_count(1), default=1,
                        help="requests scored at once (default: 1; each uses the model's CPU threads)")
    limits.add_argument("--queue", type=_count(0), default=4,
                        help="requests waiting for a slot once their upload has arrived; beyond, the answer is "
                             "503 busy (default: 4)")
    limits.add_argument("--max_pixels", type=_count(1), default=200_000_000,
                        help="pixels decoded for one request's images together; a file beyond gets an error "
                             "(default: 200000000)")
    limits.add_argument("--body_timeout", type=seconds, default=60.0,
                        help="seconds a request's upload may take to arrive whole; a slower one gets 408 "
                             "(default: 60)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto (CUDA when present; the default), cpu, cuda or cuda:N")
    r.add_argument("--theme_fusion", choices=("isolated", "batch"), default="isolated",
                   help="isolated (default): every photo scored alone; batch: the reference (a score then "
                        "depends on the other photos of its request)")
    r.add_argument("--batch_size", type=_count(1), default=8, help="images per forward pass (default: 8)")
    r.add_argument("--amp", choices=AMP_MODES, default="none",
                   help="precision: none (the default: float32, the same scores on every CPU), bf16 (faster on a GPU "
                        "or a CPU with bfloat16 instructions; scores move by up to about 0.06 on the 1..10 scale), "
                        "auto (bf16 where the device has it), fp16 (CUDA only)")
    r.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="score with BatchNorm folded and convolutions fused, channels-last "
                        "(the default, as predict.py)")
    r.add_argument("--allocator", choices=ALLOCATORS, default="tuned",
                   help="on the CPU, tuned (default): freed tensor memory is kept for the next batch")
    r.add_argument("--threads", type=_count(1), default=None,
                   help="CPU threads of the model (default: every usable core)")
    return p


def url_of(host: str, port: int) -> str:
    """The address to open for a server listening on ``host``:``port``."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        if ipaddress.ip_address(shown).version == 6:
            shown = f"[{shown}]"
    except ValueError:
        pass  # a host name
    return f"http://{shown}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: a free one); OSError if it cannot be had."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until Ctrl-C; returns the exit status."""
    args = build_parser().parse_args(argv)
    with warnings_as_lines(PROG, always=ScoringWarning):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from webapp import Limits, create_app
    except ImportError as exc:
        print(f"{PROG}: error: {one_line(exc)}; install the web extra: pip install -r requirements-deploy.txt",
              file=sys.stderr)
        return EXIT_USAGE
    # the model gets the machine: uploads are decoded in this process, between the forward passes
    torch.set_num_threads(args.threads if args.threads is not None else usable_cpus())
    try:
        if not args.path_to_model_weight:
            raise ValueError(NO_WEIGHTS_HELP)
        limits = Limits(max_file_bytes=args.max_file_bytes, max_files=args.max_files, slots=args.slots,
                        queue=args.queue, max_pixels=args.max_pixels, body_timeout=args.body_timeout)
    except ValueError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        sock = bind(args.host, args.port)  # before the slow model load: a taken port fails at once
    except OSError as exc:
        print(f"{PROG}: error: cannot listen on --host {safe_text(args.host)} --port {args.port}: {one_line(exc)}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        scorer = Scorer(args.path_to_model_weight, variant=args.variant, device=args.device,
                        theme_fusion=args.theme_fusion, batch_size=args.batch_size, amp=args.amp, fast=args.fast,
                        allow_unsafe_load=args.allow_unsafe_load, checkpoints_dir=args.checkpoints_dir,
                        download=args.download)
    except (ValueError, FileNotFoundError, DownloadError) as exc:  # CheckpointError is a ValueError
        sock.close()
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if args.allocator == "tuned" and scorer.device.type == "cpu":
        tune_cpu_allocator()
    hosts, any_address = served_hosts(args.host)
    app = create_app(scorer, limits, hosts=hosts, any_address=any_address)
    port = sock.getsockname()[1]
    where = "" if args.host in ("127.0.0.1", "localhost", "::1") else \
        f" (listening on {safe_text(args.host)}: other machines can reach it)"
    checkpoint = scorer.checkpoint.name if scorer.checkpoint else "?"
    print(f"{PROG}: TANet {scorer.variant} ({checkpoint}, {scorer.device}) scoring page at "
          f"{url_of(args.host, port)}{where}; Ctrl-C stops it", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
