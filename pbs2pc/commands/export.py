"""``pbs2pc export DIR -o model.onnx``: a compressed checkpoint folder -> ONNX with pbs2p ops."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("export", help="export a compressed model to ONNX (pbs2p ops + reference functions)",
                       description=__doc__)
    p.add_argument("checkpoint", help="folder written by pbs2pc compress")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write (weights go to FILE.data)")
    return p


def run(args) -> int:
    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.models import export, modules

    if not args.output.endswith(".onnx"):
        raise Pbs2pcError(f"the output must be an .onnx path, got {args.output!r}; e.g. -o model.onnx")
    manifest = modules.read_manifest(args.checkpoint)
    if manifest.get("exportable") is False:
        raise Pbs2pcError(f"{args.checkpoint} was compressed with {manifest.get('method')!r}, an evaluation-only "
                          "baseline outside the pbs2p op contract; compress with pbs2p, simple or "
                          "nm-then-binarize to export.")
    model, _tokenizer, manifest = modules.load_compressed(args.checkpoint)
    metadata = {k: v for k, v in manifest.items() if k != "layers"}
    path = export.export(model, args.output, metadata)
    print(f"wrote {path} and {path.name}.data")
    return 0
