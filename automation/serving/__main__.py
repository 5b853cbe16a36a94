"""`python -m automation.serving --model-dir DIR --key-file FILE [--port 0 --port-file FILE]`.

Or `python -m automation.serving --standby SOCKET --standby-id ID [--idle-timeout-s N]`: a warm
spare that does its imports now and takes these arguments later, over SOCKET (see `standby.py`).

Binds the socket first, so the port is known (and written to --port-file) before the model loads,
then serves /health at once and /ready once the model is loaded. Exits with code 1 if the model
cannot be loaded, so whoever started the process sees the failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("automation.serving")


class _QuietProbes(logging.Filter):
    """Drops access-log lines of /health and /ready: a poller would bury every real request."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) >= 3 and args[2] in ("/health", "/ready"))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m automation.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="Hugging Face model folder with a chat template")
    parser.add_argument("--key-file", required=True, help="file holding the API key (read once at start)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="where to write the bound port once listening")
    parser.add_argument("--max-new-tokens-cap", type=_positive, default=512)
    parser.add_argument("--request-timeout-ms", type=_positive, default=90_000)
    parser.add_argument("--max-batch-size", type=_positive, default=16,
                        help="requests decoded together in one step (continuous batching)")
    parser.add_argument("--max-prefill-tokens", type=_positive, default=512,
                        help="prompt tokens prefilled per step; a longer prompt is prefilled in chunks over several steps")
    parser.add_argument("--max-body-bytes", type=_positive, default=1_000_000)
    parser.add_argument("--max-messages", type=_positive, default=64)
    parser.add_argument("--max-prompt-tokens", type=_positive, default=4096,
                        help="longer conversations get 400 (also bounded by the model's context)")
    parser.add_argument("--max-tokens-in-flight", type=_positive, default=65_536,
                        help="prompt + max_new_tokens over all admitted requests; beyond it 429 + Retry-After")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads while decoding; 0: OMP_NUM_THREADS if set, else the usable CPUs less one")
    parser.add_argument("--prefill-threads", type=int, default=0,
                        help="torch threads while prefilling new prompts; 0: OMP_NUM_THREADS if set, else the usable CPUs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                        default=os.environ.get("AUTOMATION_SERVING_PRECISION", "auto"),
                        help="weights' precision; auto: bf16 where the CPU has native bf16 (AMX-BF16 or "
                             "AVX512-BF16, as oneDNN confirms) or the GPU supports it, else fp32 "
                             "(default: $AUTOMATION_SERVING_PRECISION or auto)")
    return parser.parse_args(argv)


def read_key(path: str) -> str:
    key = Path(path).read_text(encoding="utf-8").strip()
    if not key:
        raise SystemExit(f"error: the key file {path} is empty")
    return key


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; handing it to uvicorn means the port we report is the port we serve."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def write_atomically(path: str, text: str) -> None:
    """Write then rename, so a reader polling the file never sees it half written."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, target)


def parse_standby_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m automation.serving --standby",
                                     description="a warm spare server process (see standby.py)")
    parser.add_argument("--standby", required=True, metavar="SOCKET", help="Unix socket to wait on for a claim")
    parser.add_argument("--standby-id", required=True, help="marks the process as this standby (in its arguments)")
    parser.add_argument("--idle-timeout-s", type=_positive, default=1800, help="exit if unclaimed this long")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if "--standby" in argv:
        from automation.serving import standby

        options = parse_standby_args(argv)
        return standby.serve(options.standby, options.idle_timeout_s, main)
    args = parse_args(argv)
    import uvicorn

    from automation.serving.server import Generator, Settings, create_app

    settings = Settings(
        model_dir=str(Path(args.model_dir).resolve()), api_key=read_key(args.key_file), device=args.device,
        max_new_tokens_cap=args.max_new_tokens_cap, request_timeout_ms=args.request_timeout_ms,
        max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens,
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_in_flight=args.max_tokens_in_flight, threads=max(0, args.threads),
        prefill_threads=max(0, args.prefill_threads), precision=args.precision,
    )
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    if args.port_file:
        write_atomically(args.port_file, f"{port}\n")
    log.info("listening on %s:%d; loading %s", args.host, port, settings.model_dir)

    server: uvicorn.Server | None = None

    def fatal() -> None:  # the model could not load: stop serving, and exit 1 below
        if server is not None:
            server.should_exit = True

    generator = Generator(settings, on_fatal=fatal)
    app = create_app(settings, generator)
    # log_config=None: uvicorn's loggers go through the root logger configured above.
    logging.getLogger("uvicorn.access").addFilter(_QuietProbes())
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5, server_header=False)
    server = uvicorn.Server(config)
    generator.start()
    try:
        server.run(sockets=[sock])
    finally:
        generator.stop()
    if generator.failed:
        log.error("exiting: the model could not be loaded")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
