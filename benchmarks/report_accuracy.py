"""Table (markdown, printed) and plot (docs/accuracy.png) from benchmarks/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path

from pbs2pc.models.layer_error import per_layer, spbo_vs_plain

FP_BITS = {"smollm2-135m": 5.0, "gemma3-270m": 4.85}  # Q4_1: 20 bytes / 32 weights; Q4_K_M: ~4.85
DENSE = ("sign", "billm", "arb", "gptq-w2", "gptq-w3")  # methods that prune nothing: --nm does not apply


def load(results: Path) -> list[dict]:
    """The accuracy rows (``accuracy.py run`` output); the other benchmarks' files in the folder are skipped."""
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    return [r for r in rows if isinstance(r, dict) and {"model", "method", "ppl"} <= r.keys()]


def table(rows: list[dict]) -> str:
    out = ["| model | method | N:M | calib | PPL | bits honest (interchange) | bits honest (compact) | bits as the paper counts | mean layer out-err | compress s | command |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = ["fp", "sign", "billm", "arb", "gptq-w2", "gptq-w3", "nm-then-binarize-1plane", "pbs2p-1plane-nospbo",
             "pbs2p-1plane-nocfs", "pbs2p-1plane", "arb-nm", "nm-then-binarize", "pbs2p-nospbo", "pbs2p-nocfs", "pbs2p",
             "pbs2p-s8"]
    rows = sorted(rows, key=lambda r: (r["model"], order.index(r["method"]) if r["method"] in order else 99, r["nm"]))
    for r in rows:
        b = r.get("bits_per_weight")
        if r["method"] == "fp":
            bits = (f"{FP_BITS.get(r['model'], '?')} (GGUF)",) * 2 + ("16 (paper's FP16)",)
            calib, err, sec, nm = "-", "-", "-", "-"
        else:
            bits = (f"{b['interchange']:.3f}", f"{b['compact']:.3f}", f"{b['paper']:.3f}")
            calib, err, sec = f"{r['nsamples']}x{r['seqlen']}", f"{r['mean_out_err']:.4f}", f"{r['compress_seconds']:.0f}"
            nm = r["nm"] if r["method"] not in DENSE else "dense"
            if r["method"].startswith("gptq"):
                nm += f", g{r['settings']['group_size']}"
        out.append(f"| {r['model']} | {r['method']} | {nm} | {calib} | {r['ppl']:.2f} | {bits[0]} | {bits[1]} | {bits[2]} | {err} | {sec} | `{r['command']}` |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in rows:
            if r["model"] != model:
                continue
            if r["method"] == "fp":
                ax.axhline(r["ppl"], color="gray", ls="--", lw=1)
                ax.annotate(f"start (GGUF 4-bit, {FP_BITS.get(model)} bits): {r['ppl']:.1f}", xy=(0.02, r["ppl"] * 1.15),
                            xycoords=("axes fraction", "data"), fontsize=8, color="gray")
                continue
            x = r["bits_per_weight"]["compact"]
            marker = {"pbs2p": "o", "sign": "s", "billm": "^", "arb": "v", "gptq-w2": "P", "gptq-w3": "P"}.get(r["method"], "D")
            color = ("C3" if r["method"].startswith("pbs2p") and "1plane" not in r["method"]
                     else "C0" if r["method"] in DENSE else "C2")
            ax.scatter(x, r["ppl"], marker=marker, color=color)
            label = r["method"] + ("" if r["method"] in DENSE else f" {r['nm']}")
            ax.annotate(label, (x, r["ppl"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("honest bits per weight (compact: every stored plane, pattern index, scale and zero)")
        ax.set_ylabel("perplexity, lee.cor, 512-token windows (log)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def layer_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["method"] in ("pbs2p", "pbs2p-1plane") and "layer_stats" in r:
            s = spbo_vs_plain(r)
            lines.append(f"- {r['model']} {r['method']} {r['nm']} ({r['nsamples']}x{r['seqlen']}): relative block weight error "
                         f"of plain dense binarization (SPBO step 0) {s['plain']:.4f}, after SPBO {s['final']:.4f}; "
                         f"step by step for the layers at N={s['n']}: " + " -> ".join(f"{v:.4f}" for v in s["steps"]))
    keep = {("sign", None), ("arb", None), ("billm", None), ("nm-then-binarize", "6:8"), ("pbs2p-nospbo", "6:8"),
            ("pbs2p", "6:8"), ("pbs2p", "8:8"), ("arb-nm", "6:8"), ("pbs2p-1plane", "6:8"), ("gptq-w3", None)}
    by = {(r["model"], r["method"], r["nm"]): r for r in rows if "layer_stats" in r and r["nsamples"] == 16
          and ((r["method"], None) in keep or (r["method"], r["nm"]) in keep)}
    for model in sorted({k[0] for k in by}):
        keys = [k for k in by if k[0] == model]
        hdr = "| layer | " + " | ".join(f"{k[1]} {k[2] if k[1] not in DENSE else ''}" for k in keys) + " |"
        lines += ["", f"{model}: mean relative output error ||(W - W_hat) X||^2 / ||W X||^2 per decoder layer", "", hdr,
                  "|---" * (len(keys) + 1) + "|"]
        cols = [per_layer(by[k]) for k in keys]
        for i in range(len(cols[0])):
            lines.append(f"| {i} | " + " | ".join(f"{c[i]:.4f}" for c in cols) + " |")
        if (model, "pbs2p", "6:8") in by and (model, "arb-nm", "6:8") in by:
            ours, theirs = per_layer(by[(model, "pbs2p", "6:8")]), per_layer(by[(model, "arb-nm", "6:8")])
            worse = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a > b]
            lines += ["", f"{model}: pbs2p 6:8 has a layer error at or below arb-nm 6:8's on {len(ours) - len(worse)} of "
                      f"{len(ours)} layers" + (f" (above on {', '.join(map(str, worse))})" if worse else "")]
    return "\n".join(lines)


def _splice(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin (generated by benchmarks/accuracy.py report) -->", f"<!-- {name}:end -->"
    if begin not in text:
        return text
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def report(results: Path, docs: Path):
    rows = load(results)
    tab, layers = table(rows), layer_table(rows)
    print(tab + "\n\n" + layers)
    docs.mkdir(exist_ok=True)
    plot(rows, docs / "accuracy.png")
    md = docs / "accuracy.md"
    if md.exists():
        text = _splice(_splice(md.read_text(), "results", tab), "layer-errors", layers)
        md.write_text(text)
