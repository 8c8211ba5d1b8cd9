"""Draws the `versus-nchan` fan-out figure: the time until the last socket
has a message (p50 and p99) against the number of sockets, per server.

Run by the load generator (`--write-benchmarks`):
    python3 benches/plot_peer.py DATA.json OUT.png
where DATA.json is {"title", "subtitle", "series": [{"name", "sockets",
"p50_ms", "p99_ms"}]}.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

COLORS = {"Streamer": "tab:blue", "nchan": "tab:orange"}


def main(data_path: str, out_path: str) -> None:
    with open(data_path, encoding="utf-8") as f:
        data = json.load(f)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for series in data["series"]:
        color = COLORS.get(series["name"])
        ax.plot(series["sockets"], series["p99_ms"], marker="o", color=color,
                label=f'{series["name"]} p99')
        ax.plot(series["sockets"], series["p50_ms"], marker="s", color=color,
                linestyle="--", label=f'{series["name"]} p50')
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sockets (subscribers of one publish)")
    ax.set_ylabel("publish → last socket has it (ms)")
    ax.set_title(data["title"], fontsize=10)
    fig.text(0.99, 0.01, data["subtitle"], ha="right", va="bottom", fontsize=7, color="gray")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
