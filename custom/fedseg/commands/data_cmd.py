"""``fedseg data``: generate synthetic data sets and scan data (inverse-area histograms, small fractions).

Examples::

    fedseg data synth lits --out /data/lits_synth                  # "quick" preset, seed 0
    fedseg data synth lits --out /tmp/tiny --preset tiny --seed 3
    fedseg data synth polypgen --out /data/polypgen_synth          # six centres of JPEG frames + masks
    fedseg data synth covid --out /data/covid_synth                # hospitals A-E of chest CT NIfTI + infection masks
    fedseg data synth covid --out /data/covid_paper --preset paper --size 64   # the paper's 180 cases, small matrix
    fedseg data scan                                                # this site's configured data (or built-in)
    fedseg data scan --root /data/LiTS --split paper --out scan_lits
    fedseg data scan --data-config local/fedseg_data.json --sites site-1 site-2
    fedseg data scan polypgen --root /data/PolypGen2021_MultiCenterData_v3 --out scan_polypgen
    fedseg data scan covid --root /data/covid --volume-size 64 --fold 0 --out scan_covid
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from fedseg.errors import ConfigError

if TYPE_CHECKING:
    from fedseg.data.config import DataSource

_PRESETS = ("quick", "tiny", "paper")  # "paper": covid only


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data", help="generate synthetic data sets, scan data (inverse-area histograms)",
        description="Data tools: `synth` writes synthetic data in the real formats, `scan` summarises a data set "
                    "(tumour slices, FedGS small fraction) and plots the inverse-area histograms per site.")
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sub.required = True

    synth = sub.add_parser("synth", help="write a synthetic data set (real NIfTI / JPEG files)",
                           description="Write a synthetic data set in the real format. lits: volume-<i>.nii.gz, "
                                       "segmentation-<i>.nii.gz and split.json (sites site-1..4 -> centres 1-4, "
                                       "test centre 5), with per-centre scanner style and tumour-size mix. "
                                       "polypgen: data_C<n>/images_C<n>/*.jpg and data_C<n>/masks_C<n>/*_mask.jpg "
                                       "for six centres, split.json (5 folds per centre 1-5, centre 6 = test), "
                                       "with per-centre endoscope style and polyp-size mix. covid: "
                                       "<hospital>/imagesTr/<case>.nii.gz and <hospital>/labelsTr/<case>.nii.gz for "
                                       "hospitals A-E (chest CT with infection masks; per-hospital scanner, slice "
                                       "thickness and case count), no split.json (automatic 5-fold per hospital).")
    synth.add_argument("dataset", choices=("lits", "polypgen", "covid"), help="data set format to generate")
    synth.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    synth.add_argument("--preset", choices=_PRESETS, default="quick",
                       help="quick (default; lits: 256x256, 30 volumes; polypgen: 212 frames of 256-384 px; covid: "
                            "96x96, 32 volumes), tiny (tests; lits: 128x128, 10 volumes; polypgen: 41 frames of "
                            "~100-150 px; covid: 40x40, 25 volumes) or paper (covid only: 512x512, 180 volumes, "
                            "A 119 / B 22 / C 18 / D 12 / E 9)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical data)")
    synth.add_argument("--size", type=int, default=None,
                       help="covid only: in-plane matrix size overriding the preset's (e.g. --preset paper --size 64)")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=run_synth)

    scan = sub.add_parser("scan", help="inverse-area histograms and small fractions per site",
                          description="Read the segmentations / masks of each site's centre (all split parts or "
                                      "folds) and of the test centre, and write inverse_area_<site>.png (log x-axis, "
                                      "tau marked; FedGS supplementary Fig. 1; PolypGen: H*W / area of the smallest "
                                      "polyp), summary.json and summary.md.")
    scan.add_argument("dataset", nargs="?", choices=("lits", "polypgen", "covid"), default="lits",
                      help="data set (default: lits)")
    where = scan.add_mutually_exclusive_group()
    where.add_argument("--data-config", type=Path, default=None,
                       help="data-configuration JSON (the format of local/fedseg_data.json); default: "
                            "$FEDSEG_DATA_CONFIG, else the built-in synthetic data")
    where.add_argument("--root", type=Path, default=None, help="data root to scan directly (all sites share it)")
    scan.add_argument("--split", default=None,
                      help="with --root: 'paper', 'auto' or a split JSON (default: ROOT/split.json, else auto)")
    scan.add_argument("--sites", nargs="+", default=None, metavar="SITE",
                      help="sites to scan (default: every site of the split, plus its test centre)")
    scan.add_argument("--no-test", action="store_true", help="do not scan the split's test centre")
    scan.add_argument("--min-tumour-pixels", type=int, default=None,
                      help="lits: keep slices with at least this many tumour pixels (default: the synthetic data's "
                           "recommended value if the root is synthetic, else 50)")
    scan.add_argument("--mask-threshold", type=int, default=None,
                      help="polypgen: lesion = mask gray > this (default 127)")
    scan.add_argument("--n-folds", type=int, default=5, help="polypgen: folds of the split (default 5)")
    scan.add_argument("--tau", type=float, default=None,
                      help="small threshold on a_inv (default: lits 1000, polypgen 150)")
    scan.add_argument("--base", type=float, default=None, help="difficulty log base (default: lits 1000, "
                                                                "polypgen 100)")
    scan.add_argument("--volume-size", type=int, default=64,
                      help="covid: cube side of the preprocessing (data_args volume_size, default 64)")
    scan.add_argument("--fold", type=int, default=0, help="covid: fold of the automatic 5-fold split (default 0)")
    scan.add_argument("--out", type=Path, default=Path("fedseg_scan"), help="output folder (default ./fedseg_scan)")
    scan.set_defaults(func=run_scan)


def run_synth(args: argparse.Namespace, out: TextIO | None = None) -> int:
    if args.dataset == "covid":
        return _run_synth_covid(args, out)
    if args.preset == "paper" or getattr(args, "size", None) is not None:
        raise ConfigError(f"--preset paper and --size apply to covid only; {args.dataset} has presets quick and tiny")
    if args.dataset == "polypgen":
        return _run_synth_polypgen(args, out)
    from fedseg.data.lits import resolve_lits_split
    from fedseg.data.config import DataSource
    from fedseg.data.scan import format_table, summarize_split
    from fedseg.data.synthetic import RECOMMENDED_MIN_TUMOUR_PIXELS, synth_lits

    out = sys.stdout if out is None else out
    t0 = time.perf_counter()
    root = synth_lits(args.out, preset=args.preset, seed=args.seed, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    min_px = RECOMMENDED_MIN_TUMOUR_PIXELS[args.preset]
    src = DataSource("lits", root, None, None, None, f"fedseg data synth --out {root}")
    _, cases, split = resolve_lits_split(src)
    groups = summarize_split(root, cases, split, min_px)
    print(f"wrote synthetic LiTS ({args.preset}, seed {args.seed}, {len(cases)} volumes) to {root.resolve()} "
          f"in {seconds:.1f} s", file=out)
    print(f"tumour slices with >= {min_px} px (use min_tumour_pixels={min_px} for this preset); small = "
          f"a_inv >= 1000:", file=out)
    print(format_table([g.summary() for g in groups]), file=out)
    return 0


def _scan_sources(args: argparse.Namespace, dataset: str) -> Callable[[str], DataSource]:
    """Site name -> data source of ``fedseg data scan``: ``--root`` (and ``--split``) for every site when given,
    else the site's entry in the data configuration (``--data-config`` or ``$FEDSEG_DATA_CONFIG``)."""
    from fedseg.data.config import CONFIG_ENV, DataSource, resolve_data_source

    if args.split is not None and args.root is None:
        raise ConfigError("--split only applies with --root (a data configuration names its own split)")
    env: dict[str, str] = dict(os.environ)
    if args.data_config is not None:
        if not args.data_config.is_file():
            raise ConfigError(f"--data-config {args.data_config}: file does not exist")
        env[CONFIG_ENV] = str(args.data_config.resolve())

    def source_for(site: str) -> DataSource:
        if args.root is not None:
            return DataSource(dataset, args.root, args.split, None, None, f"--root {args.root}")
        return resolve_data_source(dataset, site, workspace_root=None, env=env)

    return source_for


def run_scan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    if args.dataset == "covid":
        return _run_scan_covid(args, out)
    if args.dataset == "polypgen":
        return _run_scan_polypgen(args, out)
    if args.mask_threshold is not None:
        raise ConfigError("--mask-threshold applies to polypgen only (LiTS labels are 0/1/2)")
    from fedseg.data.lits import resolve_lits_split
    from fedseg.data.scan import format_table, recommended_min_pixels, scan_centre, scan_lits
    from fedseg.data.splits import PARTS, centre_for_site
    from fedseg.difficulty import LITS_BASE, LITS_TAU

    out = sys.stdout if out is None else out
    source_for = _scan_sources(args, "lits")
    base = LITS_BASE if args.base is None else args.base
    tau = LITS_TAU if args.tau is None else args.tau
    # the split of the first site (or of a site-less lookup) decides the default site list and test centre
    first = source_for(args.sites[0] if args.sites else "scan")
    root0, cases0, split0 = resolve_lits_split(first, progress=True)
    min_px = args.min_tumour_pixels
    if min_px is None:
        min_px = recommended_min_pixels(root0) or 50
    if min_px < 0:
        raise ConfigError(f"--min-tumour-pixels must be >= 0, got {min_px}")
    sites = list(args.sites) if args.sites else list(split0.sites)
    groups = []
    if not sites and not args.sites:  # automatic split without a site mapping: one local group
        for centre in split0.centres:
            if centre != split0.test_centre:
                groups.append(scan_centre(centre, root0, cases0, split0, centre, min_px, base, tau))
    for site in sites:
        src = source_for(site)
        root, cases, split = (root0, cases0, split0) if src == first else resolve_lits_split(src, progress=True)
        centre = centre_for_site(split, site, src.centre)
        groups.append(scan_centre(site, root, cases, split, centre, min_px, base, tau, parts=PARTS))
    if split0.test_centre is not None and not args.no_test:
        groups.append(scan_centre("test", root0, cases0, split0, split0.test_centre, min_px, base, tau,
                                  parts=("test",)))
    result = scan_lits(groups, args.out, min_tumour_pixels=min_px, base=base, tau=tau)
    print(f"scanned {first.origin}; tumour slices with >= {min_px} px, small = a_inv >= {tau:g}:", file=out)
    print(format_table(result["groups"]), file=out)
    print(f"wrote {', '.join(result['files'])} to {Path(args.out).resolve()}", file=out)
    return 0


# ------------------------------------------------------------------------------------------ PolypGen
def _run_synth_polypgen(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from fedseg.data.config import DataSource
    from fedseg.data.polypgen import PolypGenPreprocessing, centre_number, find_polypgen_centres, load_polypgen_split
    from fedseg.data.scan_polypgen import format_polypgen_table, scan_polypgen_group
    from fedseg.data.synthetic_polypgen import CENTRE_STYLES, synth_polypgen

    out = sys.stdout if out is None else out
    t0 = time.perf_counter()
    root = synth_polypgen(args.out, preset=args.preset, seed=args.seed, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    src = DataSource("polypgen", root, None, None, None, f"fedseg data synth polypgen --out {root}")
    on_disk = find_polypgen_centres(root)
    prep = PolypGenPreprocessing()
    split = load_polypgen_split(src.split, root, on_disk, prep.n_folds)
    groups = []
    for centre, c in split.centres.items():
        wanted = set(c.stems())
        pairs = [pm for pm in on_disk[centre_number(centre)] if pm[0].stem in wanted]
        groups.append(scan_polypgen_group(centre, root, centre, pairs, split.fold_of(centre)))
    meta = json.loads((root / "synthetic.json").read_text(encoding="utf-8"))
    n_frames = sum(len(g.stems) for g in groups)
    print(f"wrote synthetic PolypGen ({args.preset}, seed {args.seed}, {n_frames} frames in {len(groups)} centres) "
          f"to {root.resolve()} in {seconds:.1f} s", file=out)
    print("frames per centre; small = H*W / area(smallest polyp) >= 150 (FedGS PolypGen rule, "
          "fedseg.difficulty.polypgen_difficulty):", file=out)
    print(format_polypgen_table([g.summary() for g in groups]), file=out)
    sizes = ", ".join(f"{c}: {'x'.join(map(str, meta['centres'][c]['frame_size']))} {CENTRE_STYLES[c].border}"
                      for c in CENTRE_STYLES)
    print(f"frame sizes (W x H) and field-of-view borders: {sizes}", file=out)
    kinds = ", ".join(f"{c}: {k['attached']}" for c, k in meta["kinds"].items())
    print(f"frames with a small polyp attached to a large one: {kinds}", file=out)
    return 0


def _run_scan_polypgen(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from fedseg.data.polypgen import PolypGenPreprocessing, require_centre, centre_number, resolve_polypgen
    from fedseg.data.scan_polypgen import format_polypgen_table, scan_polypgen, scan_polypgen_group
    from fedseg.data.splits import centre_for_site
    from fedseg.difficulty import POLYPGEN_BASE, POLYPGEN_TAU

    out = sys.stdout if out is None else out
    if args.min_tumour_pixels is not None:
        raise ConfigError("--min-tumour-pixels applies to lits only (PolypGen frames are all kept)")
    source_for = _scan_sources(args, "polypgen")
    prep = PolypGenPreprocessing(n_folds=args.n_folds,
                                 mask_threshold=127 if args.mask_threshold is None else args.mask_threshold,
                                 base=POLYPGEN_BASE if args.base is None else args.base,
                                 tau=POLYPGEN_TAU if args.tau is None else args.tau)
    first = source_for(args.sites[0] if args.sites else "scan")
    resolved = {first: resolve_polypgen(first, prep, progress=True)}
    root0, _, split0, _ = resolved[first]
    sites = list(args.sites) if args.sites else list(split0.sites)

    def group(label: str, src: DataSource, centre: str | None, part: str) -> Any:
        if src not in resolved:
            resolved[src] = resolve_polypgen(src, prep, progress=True)
        root, on_disk, split, _ = resolved[src]
        who = f"site {label}" if part == "train" else "the test-centre scan"
        if centre is None:
            centre = centre_for_site(split, label, src.centre)  # type: ignore[arg-type]
        require_centre(root, on_disk, split, centre, who, src.origin)
        c = split.centres[centre]
        wanted = set(c.test if part == "test" else [s for f in c.folds for s in f])
        pairs = [pm for pm in on_disk[centre_number(centre)] if pm[0].stem in wanted]
        fold_of = split.fold_of(centre) if part != "test" else {}
        return scan_polypgen_group(label, root, centre, pairs, fold_of, prep.mask_threshold, prep.base, prep.tau)

    groups = [group(site, source_for(site), None, "train") for site in sites]
    if split0.test_centre is not None and not args.no_test:
        groups.append(group("test", first, split0.test_centre, "test"))
    result = scan_polypgen(groups, args.out, mask_threshold=prep.mask_threshold, base=prep.base, tau=prep.tau)
    print(f"scanned {first.origin} ({root0}); small = H*W / area(smallest polyp) >= {prep.tau:g}:", file=out)
    print(format_polypgen_table(result["groups"]), file=out)
    print(f"wrote {', '.join(result['files'])} to {Path(args.out).resolve()}", file=out)
    return 0


# ------------------------------------------------------------------------------------------ COVID
def _run_synth_covid(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from fedseg.data.synthetic_covid import HOSPITALS, synth_covid

    out = sys.stdout if out is None else out
    overrides = {} if args.size is None else {"size": args.size}
    t0 = time.perf_counter()
    root = synth_covid(args.out, preset=args.preset, seed=args.seed, progress=not args.no_progress, **overrides)
    seconds = time.perf_counter() - t0
    meta = json.loads((root / "synthetic.json").read_text(encoding="utf-8"))
    n = sum(len(c) for c in meta["cases"].values())
    print(f"wrote synthetic COVID CT ({args.preset}, seed {args.seed}, {n} volumes in {len(meta['cases'])} hospitals) "
          f"to {root.resolve()} in {seconds:.1f} s", file=out)
    print("| hospital | scanner | cases | slice mm | pixel mm | slices | lesions small/medium/large | infected % |",
          file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for h, cases in meta["cases"].items():
        kinds = [les["kind"] for c in cases for les in c["lesions"]]
        vox = sum(math.prod(c["shape"]) for c in cases)
        inf = sum(c["infection_voxels"] for c in cases)
        px = [c["pixel_mm"] for c in cases]
        nz = [c["shape"][2] for c in cases]
        thick = sorted({c["slice_thickness_mm"] for c in cases})
        print(f"| {h} | {HOSPITALS[h].scanner} | {len(cases)} | {', '.join(f'{t:g}' for t in thick)} | "
              f"{min(px):.2f}-{max(px):.2f} | {min(nz)}-{max(nz)} | {kinds.count('small')}/{kinds.count('medium')}/"
              f"{kinds.count('large')} | {100.0 * inf / vox:.2f} |", file=out)
    print("no split.json: the reader splits each hospital into 5 folds (data_args \"fold\"); sites site-1..site-5 "
          "hold hospitals A..E", file=out)
    return 0


def _run_scan_covid(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Per site and part: hospital, cases, 2.5D samples, samples with infection and small ones (LiTS rule on the
    axial cube slice), and the scanners' slice thicknesses; writes summary.json and summary.md."""
    from fedseg.data.covid import CovidPreprocessing, load_covid_site, resolve_covid
    from fedseg.difficulty import LITS_BASE, LITS_TAU

    out = sys.stdout if out is None else out
    for opt in ("min_tumour_pixels", "mask_threshold"):
        if getattr(args, opt) is not None:
            raise ConfigError(f"--{opt.replace('_', '-')} does not apply to covid")
    prep = CovidPreprocessing(volume_size=args.volume_size, fold=args.fold,
                              base=LITS_BASE if args.base is None else args.base,
                              tau=LITS_TAU if args.tau is None else args.tau)
    source_for = _scan_sources(args, "covid")
    first = source_for(args.sites[0] if args.sites else "scan")
    _, _, split0 = resolve_covid(first, prep.fold, progress=True)
    rows = []
    for site in list(args.sites) if args.sites else list(split0.sites):
        src = source_for(site)
        parts = ("train", "val") if args.no_test else ("train", "val", "test")
        for part in parts:
            ds = load_covid_site(src, site, part, prep, progress=True)
            spacing = [c.record["spacing_mm"][2] for c in ds.cases]
            rows.append({"site": site, "hospital": ds.centre, "part": part, "cases": len(ds.cases),
                         "samples": len(ds), "with_infection": int(ds.nonempty.sum()), "small": int(ds.small.sum()),
                         "slice_mm": sorted({round(float(z), 3) for z in spacing})})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"dataset": "covid", "source": first.origin,
                                                       "split": split0.source, "prep": prep.to_json(),
                                                       "groups": rows}, indent=1), encoding="utf-8")
    head = "| site | hospital | part | cases | samples | with infection | small | slice mm |\n|---|---|---|---|---|---|---|---|"
    lines = [head] + [f"| {r['site']} | {r['hospital']} | {r['part']} | {r['cases']} | {r['samples']} | "
                      f"{r['with_infection']} | {r['small']} | {', '.join(f'{t:g}' for t in r['slice_mm'])} |"
                      for r in rows]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"scanned {first.origin} ({split0.source}; cube {prep.volume_size}^3, small = a_inv >= {prep.tau:g} on the "
          f"axial slice):", file=out)
    print("\n".join(lines), file=out)
    print(f"wrote summary.json, summary.md to {Path(args.out).resolve()}", file=out)
    return 0
