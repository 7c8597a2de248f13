"""FreeDA's retrieval step on CPU (preset ``retrieval``).

``PrototypeBank.class_prototypes`` (the ``k`` = 350 nearest keys of each of 150 class queries, mean
of their prototypes) over banks of ``--bank-sizes`` random L2-normalised keys (dimension 768, CLIP
ViT-L/14 text) and prototypes (768, DINOv2 ViT-B), for each faiss index kind that ``build_index``
makes (flat, HNSW, IVF; several search breadths each) and for a brute-force matrix product in torch
that computes the same result without faiss. Each (bank size, index) is one worker process: it
generates the bank, builds the index (timed, with its memory), times ``--repeats`` calls after a
warm-up call with the search inside them timed apart, then measures recall@k against the exact top
k. An index whose build time, extrapolated from the smaller banks of the same index, exceeds what is
left of ``--budget-min`` is skipped and the estimate reported (the exact references, brute force and
flat, always run).
"""
import logging
import math
import statistics
import time

from . import harness
from .harness import fmt_ms, fmt_s

logger = logging.getLogger("diffseg_d2.benchmark")

PRESET = "retrieval"
DEFAULT_REPEATS = 7
# FreeDA's reference setting (ADE20K's 150 classes, top 350 keys).
KEY_DIM = 768  # CLIP ViT-L/14 text embedding
PROTOTYPE_DIM = 768  # DINOv2 ViT-B feature
RETRIEVAL_CLASSES = 150
RETRIEVAL_TOP_K = 350
TARGET_RETRIEVAL_MS = 50.0  # 150 classes ...
TARGET_RETRIEVAL_KEYS = 10**6  # ... on a bank of this many keys, on CPU
HNSW_M = 32  # build_index's default
# Growth of an approximate index's build time with the bank size, t ~ n^this: the least the
# algorithm allows (HNSW: n log n; IVF: k-means of n keys into 4 sqrt(n) lists), used where the
# measured builds suggest less. Builds under MIN_FIT_BUILD_S are too noisy to fit. The exact
# methods (brute force, flat) are the references: they are never skipped.
BUILD_EXPONENTS = {"hnsw": 1.1, "ivf": 1.5}
MIN_FIT_BUILD_S = 1.0


# ====================================================================== what is measured (in the worker)
def measure(spec: dict) -> dict:
    """One bank size and one index: build it, then per search breadth time ``class_prototypes``."""
    from diffseg_d2.freeda.bank import PrototypeBank, build_index, set_search_breadth
    from diffseg_d2.optional_imports import require

    faiss = require("faiss", "faiss-cpu", "The retrieval preset of tools/benchmark.py")
    faiss.omp_set_num_threads(harness.threads(spec["threads"]))
    n, k, repeats = spec["size"], spec["top_k"], spec["repeats"]
    start = time.perf_counter()
    keys = harness.random_unit_rows(n, KEY_DIM, seed=0)
    prototypes = harness.random_unit_rows(n, PROTOTYPE_DIM, seed=1)
    queries = harness.random_unit_rows(spec["classes"], KEY_DIM, seed=2)
    setup_s = time.perf_counter() - start
    logger.info("%s: bank of %d random keys generated in %.1f s, building", spec["name"], n, setup_s)
    meter = harness.PeakMemory("cpu")
    meter.start()
    build_load = harness.OtherLoad()
    build_load.start()
    build = {}
    if spec["method"] == "brute":
        bank, build_s = brute_force_bank(keys, prototypes), 0.0
    else:
        build_s, (index, kind) = harness.timed(
            lambda: build_index(keys.numpy(), spec["method"], **spec["build"]), "cpu")
        bank = PrototypeBank(index, prototypes, [""] * n, {})
        inner = faiss.downcast_index(index)
        build = {"kind": kind, **({"nlist": int(inner.nlist)} if hasattr(inner, "nlist") else {})}
        logger.info("%s: %s index built in %.1f s", spec["name"], kind, build_s)
    build_peak_mib, before_build_mib = meter.increase_mib(), meter.baseline_mib
    build_other_load = build_load.fraction() if spec["method"] != "brute" else None
    meter.start()
    index_mib = meter.baseline_mib - before_build_mib  # what the built index keeps resident

    search = bank.search
    search_s = []

    def timed_search(q, top_k):
        t, out = harness.timed(lambda: search(q, top_k), "cpu")
        search_s.append(t)
        return out

    bank.search = timed_search  # class_prototypes calls it: the search inside each call is timed apart
    rows, exact_ids = [], None
    for setting in spec["search"]:
        breadth = {}
        if spec["method"] != "brute":
            set_search_breadth(index, k, setting.get("ef_search", 0), setting.get("nprobe", 1))
            breadth = {name: int(getattr(obj, name)) for obj, name in ((getattr(inner, "hnsw", None), "efSearch"),
                                                                      (inner, "nprobe")) if hasattr(obj, name)}
        meter.start()
        load = harness.OtherLoad()
        load.start()
        times = []
        for i in range(1 + repeats):
            search_s.clear()
            t, _ = harness.timed(lambda: bank.class_prototypes(queries, k), "cpu")
            if i > 0:  # the first call is the warm-up
                times.append((t, search_s[0]))
        peak_mib, other_load = meter.increase_mib(), load.fraction()
        _, ids = search(queries, k)
        if exact_ids is None:  # after the timings, so that its (Q, n) similarities are in no peak above
            exact_ids = ids if spec["method"] == "brute" else (queries @ keys.T).topk(k, dim=1)[1]
        rows.append({
            "setting": setting,
            "breadth": breadth,
            "times": [t for t, _ in times],
            "search_times": [s for _, s in times],
            "recall": recall_at_k(ids, exact_ids),
            "missing": int((ids < 0).sum()),
            "peak_mib": peak_mib,
            "other_load": other_load,
        })
        logger.info("%s %s: median %.1f ms, recall@%d %.3f", spec["name"], breadth or "",
                    1e3 * statistics.median(rows[-1]["times"]), k, rows[-1]["recall"])
    return {
        "rows": rows,
        "build_s": build_s,
        "build": build,
        "build_peak_mib": build_peak_mib,
        "build_other_load": build_other_load,
        "index_mib": index_mib,
        "faiss": faiss.__version__,
    }


def brute_force_bank(keys, prototypes):
    """A ``PrototypeBank`` whose search is ``queries @ keys.T`` and ``topk`` in torch (no faiss).

    Its ``class_prototypes`` is the bank's own, so the two differ in the search only.
    """
    from diffseg_d2.freeda.bank import PrototypeBank

    class BruteForceBank(PrototypeBank):
        def __init__(self):  # no faiss index
            self.keys, self.prototypes, self.nouns, self.manifest = keys, prototypes, [], {}

        def search(self, queries, k):
            return (queries @ self.keys.T).topk(max(1, min(int(k), len(self))), dim=1)

    return BruteForceBank()


def recall_at_k(ids, exact_ids) -> float:
    """Mean over queries of the share of the exact top-k ids that ``ids`` found."""
    import torch

    found = sum(int(torch.isin(row, ref).sum()) for row, ref in zip(ids, exact_ids))
    return found / exact_ids.numel()


# ====================================================================== how the configurations are built
def configurations(args) -> list:
    """Per bank size, smallest first: brute force, then each faiss index with all its search breadths."""
    base = {"preset": PRESET, "threads": args.threads, "repeats": args.repeats or DEFAULT_REPEATS,
            "classes": RETRIEVAL_CLASSES, "top_k": RETRIEVAL_TOP_K}
    indexes = [
        ("brute", "brute", "brute force (torch matmul + topk)", {}, [{}]),
        ("flat", "flat", "faiss flat (exact)", {}, [{}]),
        ("ivf", "ivf", "faiss IVF", {"ivf_nlist": 0}, [{"nprobe": v} for v in args.nprobe]),
    ]
    indexes += [("hnsw", f"hnsw-efc{efc}", f"faiss HNSW M={HNSW_M} efC={efc}",
                 {"hnsw_m": HNSW_M, "hnsw_ef_construction": efc}, [{"ef_search": v} for v in args.ef_search])
                for efc in args.ef_construction]
    return [{**base, "name": f"{family}-{n}", "family": family, "method": method, "label": label, "size": n,
             "build": build, "search": search}
            for n in args.bank_sizes for method, family, label, build, search in indexes]


def estimated_build_s(method: str, history: list, n: int):
    """``(seconds, exponent)`` to build an approximate index over ``n`` keys, or None (exact methods,
    or no smaller bank measured yet).

    A power law ``t ~ n^exponent`` from the largest ``(keys, seconds)`` build of the same index
    measured so far; the exponent is fitted through the two largest builds (those of at least
    ``MIN_FIT_BUILD_S``) and is at least ``BUILD_EXPONENTS[method]``.
    """
    history = [(keys, t) for keys, t in history if t > 0]
    if method not in BUILD_EXPONENTS or not history:
        return None
    n2, t2 = history[-1]
    exponent = BUILD_EXPONENTS[method]
    fit = [(keys, t) for keys, t in history[-2:] if t >= MIN_FIT_BUILD_S]
    if len(fit) == 2 and fit[0][0] != fit[1][0]:
        (n1, t1), (n2, t2) = fit
        exponent = max(exponent, math.log(t2 / t1) / math.log(n2 / n1))
    return t2 * (n / n2) ** exponent, exponent


def run(preset: str, args, device: str) -> dict:
    """Every retrieval configuration in its own process (always on CPU); an approximate index whose build
    would overrun --budget-min is skipped."""
    start = time.perf_counter()
    specs = configurations(args)
    results, builds = {}, {}
    # Per bank size, the exact references last (never skipped), so the budget left goes to the
    # approximate indexes whose build may not fit.
    for s in sorted(specs, key=lambda s: (s["size"], s["method"] not in BUILD_EXPONENTS)):
        history = builds.setdefault(s["family"], [])
        estimate = estimated_build_s(s["method"], history, s["size"])
        left_s = 60 * args.budget_min - (time.perf_counter() - start)
        if estimate and estimate[0] > left_s:
            measured = ", ".join(f"{n:,} keys {fmt_s(t)} s" for n, t in history)
            left = f"the {harness.fmt_min(left_s)} left of" if left_s > 0 else "the spent"
            why = (f"not built: its build is estimated at {harness.fmt_min(estimate[0])} (t ~ n^{estimate[1]:.2f} "
                   f"from the builds measured here: {measured}), over {left} --budget-min {args.budget_min:g}")
            logger.warning("%s: %s: %s", PRESET, s["name"], why)
            results[s["name"]] = {"skipped": why}
            continue
        results.update(harness.run_each([s], args.wait_quiet))
        if "error" not in results[s["name"]]:
            history.append((s["size"], results[s["name"]]["build_s"]))
    return {"preset": PRESET, "specs": specs, "results": results, "wall_s": time.perf_counter() - start}


# ====================================================================== how the table is rendered
def render(run: dict, cmdline: str) -> str:
    ok = [r for r in run["results"].values() if "rows" in r]
    info = ok[0] if ok else {}
    k = RETRIEVAL_TOP_K
    repeats = run["specs"][0]["repeats"] if run["specs"] else "?"
    brute = {s["size"]: row for s, r, row in result_rows(run) if s["method"] == "brute" and row}
    machine = (f"{harness.cpu_model()}, {info.get('threads', '?')} threads (torch and faiss); torch "
               f"{info.get('torch', '?')}, faiss {info.get('faiss', '?')}, float32")
    out = harness.heading(f"{PRESET}: FreeDA retrieval, {RETRIEVAL_CLASSES} classes, k = {k}, random banks",
                          machine, run, cmdline) + [
        f"- Bank: random L2-normalised keys (dim {KEY_DIM}, as CLIP ViT-L/14 text embeddings) and prototypes "
        f"(dim {PROTOTYPE_DIM}, as DINOv2 ViT-B features); {RETRIEVAL_CLASSES} random L2-normalised class queries",
        f"- Time: `PrototypeBank.class_prototypes(queries, {k})`, median of {repeats} calls after one warm-up; "
        f"*search* is the index search inside those calls (brute force: `queries @ keys.T` and `topk`), "
        f"*prototype mean* the rest of them (the mean of the {k} prototypes of each class)",
        f"- Recall@{k}: share of the exact {k} nearest keys (torch matmul + topk) that the index returned. Random "
        "keys are a worst case for approximate indexes: they form no clusters, so a query's nearest keys are "
        "spread over the whole space; real keys cluster, so expect higher recall on a real bank",
        "- Memory: *index MB* is the RSS the built index adds (faiss holds its own copy of the keys); *peak MB* "
        "the increase of peak RSS while building and while searching",
        "",
        f"| keys | index | build s | search breadth | median ms | min-max ms | search ms | prototype mean ms | "
        f"time / brute force: all / search | recall@{k} | index MB | peak MB build / search | "
        "other processes' CPU |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, r, row in result_rows(run):
        head = f"| {s['size']:,} | {index_label(s, r)} |"
        if row is None:
            why = r.get("skipped") or f"failed: {r.get('error')}"
            out.append(f"{head} {why} | | | | | | | | | | |")
            continue
        med, search = statistics.median(row["times"]), statistics.median(row["search_times"])
        mean = statistics.median(t - t_search for t, t_search in zip(row["times"], row["search_times"]))
        ref = brute.get(s["size"])
        ratio = "-" if ref is None else (f"{med / statistics.median(ref['times']):.2f}x / "
                                         f"{search / statistics.median(ref['search_times']):.2f}x")
        recall = "1 (reference)" if s["method"] == "brute" else f"{row['recall']:.3f}"
        if row["missing"]:
            recall += f" ({row['missing']} ids missing)"
        load = "-" if row["other_load"] is None else f"{100 * row['other_load']:.0f}%"
        if s["method"] == "brute":  # nothing built
            build_s = index_mib = build_peak = "-"
        else:
            build_s = fmt_s(r["build_s"])
            index_mib, build_peak = (f"{max(0.0, r[key]):.0f}" for key in ("index_mib", "build_peak_mib"))
        out.append(
            f"{head} {build_s} | {breadth_label(row)} | {fmt_ms(med)} | "
            f"{fmt_ms(min(row['times']))}-{fmt_ms(max(row['times']))} | {fmt_ms(search)} | "
            f"{fmt_ms(mean)} | {ratio} | {recall} | "
            f"{index_mib} | {build_peak} / {max(0.0, row['peak_mib']):.0f} | {load} |")
    out.append("")
    loads = [(f"{s['name']} build", run["results"][s["name"]].get("build_other_load")) for s in run["specs"]]
    loads += [(s["name"] + (f" {breadth_label(row)}" if row["breadth"] else ""), row["other_load"])
              for s, r, row in result_rows(run) if row]
    out += harness.busy_note(loads)
    out += [f"Target ({RETRIEVAL_CLASSES} classes, medians of this run):", ""]
    out += target_lines(run)
    return "\n".join(out) + "\n"


def result_rows(run: dict):
    """``(spec, result, row)`` per measured search breadth, ``(spec, result, None)`` per skipped or failed index."""
    for s in run["specs"]:
        r = run["results"][s["name"]]
        for row in r.get("rows") or [None]:
            yield s, r, row


def index_label(s: dict, r: dict) -> str:
    nlist = r.get("build", {}).get("nlist")
    return s["label"] + (f" nlist={nlist}" if nlist else "")


def breadth_label(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row["breadth"].items()) or "-"


def config_label(s: dict, r: dict, row: dict) -> str:
    return index_label(s, r) + (f", {breadth_label(row)}" if row["breadth"] else "")


def target_lines(run: dict) -> list:
    n = TARGET_RETRIEVAL_KEYS
    goal = f"{RETRIEVAL_CLASSES} classes on a {n:,}-key bank under {TARGET_RETRIEVAL_MS:g} ms on CPU"
    measured = [(s, r, row) for s, r, row in result_rows(run) if s["size"] == n and row]
    if not measured:
        return [f"- not measured: {goal} (needs {n} in --bank-sizes)"]
    lines = []
    for s, r, row in measured:
        med = statistics.median(row["times"])
        lines.append(f"- **{harness.check(1e3 * med < TARGET_RETRIEVAL_MS)}** {config_label(s, r, row)}: "
                     f"**{fmt_ms(med)} ms** (search {fmt_ms(statistics.median(row['search_times']))} ms), "
                     f"recall@{RETRIEVAL_TOP_K} {row['recall']:.3f}")
    passed = [line for line in lines if line.startswith("- **PASS**")]
    s, r, row = min(measured, key=lambda m: statistics.median(m[2]["times"]))
    fastest = f"{config_label(s, r, row)}, {fmt_ms(statistics.median(row['times']))} ms"
    lines.append(f"- **{harness.check(bool(passed))}** overall, {goal}: "
                 f"{len(passed)} of {len(lines)} measured configurations; fastest: {fastest}")
    skipped = [index_label(s, r) for s, r, row in result_rows(run) if s["size"] == n and not row]
    if skipped:
        lines.append(f"- not measured at {n:,} keys: {', '.join(skipped)} (see the table)")
    return lines
