"""``pbs2pc demo``: compress the bundled SmolLM2-135M at 6:8 with PBS2P, export, compile for x86, run a
prompt, and print perplexity for the original model, the compressed PyTorch model, onnxruntime and the
compiled library, and the greedy continuation of the original and the compiled model, side by side."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("demo", help="the whole pipeline on the bundled model, with perplexity at every stage",
                       description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="model spec (default: the bundled smollm2-135m)")
    p.add_argument("--nm", default="6:8", help="N:M scheme (default 6:8)")
    p.add_argument("--out", default="out/demo", help="folder for the ONNX file and the compiled library")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window length in tokens (default 512)")
    p.add_argument("--windows", type=int, help="score only the first N windows (default: all)")
    p.add_argument("--method", default="pbs2p",
                   help="compression method (default pbs2p with 16 x 512 calibration tokens, about 6 minutes on 2 "
                        "cores; simple: no calibration, seconds, and a collapsed model)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows for calibrated methods (default 16)")
    return p


def run(args) -> int:
    from pbs2pc.demo import format_result, run_demo

    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.models.compress import METHODS, PYTORCH_ONLY
    from pbs2pc.models.format import NMScheme

    NMScheme.parse(args.nm, None)
    if args.method not in METHODS or args.method in PYTORCH_ONLY:
        exportable = sorted(m for m in METHODS if m not in PYTORCH_ONLY)
        raise Pbs2pcError(f"the demo cannot use method {args.method!r}; choose one of: {', '.join(exportable)}.")
    result = run_demo(args.model, args.nm, args.out, seqlen=args.seqlen, windows=args.windows,
                      method=args.method, nsamples=args.nsamples)
    print(format_result(result))
    return 0
