"""Opens a run's outputs in neuroglancer.

    python -m synjax.view RUN [--bind-address=127.0.0.1] [--port=0]

RUN is a `--workdir` of `synjax.main` after predict, or the
`--config.predict.output` folder of a volume of your own: its
`neuroglancer_state.json` (raw, predictions, segmentation, synapses) is
served from this machine (an own volume's input from where it lies) and the
URL to open is printed; Ctrl-C stops it.
Needs `pip install 'synjax[view]'`. The work is in
`synjax.report.neuroglancer_state` and `synjax.report.neuroglancer_serve`.
"""

from __future__ import annotations

import argparse
import sys
import threading

from synjax.errors import SynjaxError
from synjax.report import neuroglancer_serve, neuroglancer_state


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m synjax.view", description="Serve a synjax run's outputs in neuroglancer."
    )
    parser.add_argument(
        "run",
        metavar="RUN",
        help="the run folder (--workdir of synjax.main) or a --config.predict.output folder",
    )
    parser.add_argument(
        "--bind-address",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 to open the viewer from another machine",
    )
    parser.add_argument("--port", type=int, default=0, help="viewer port (0: any free one)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        served = neuroglancer_serve.serve(
            neuroglancer_state.read_state(args.run), args.bind_address, args.port
        )
    except SynjaxError as error:
        sys.exit(f"synjax: error: {error}")
    print(served.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        served.stop()


if __name__ == "__main__":
    main()
