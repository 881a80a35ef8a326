"""``fedseg he-context`` and ``fedseg he-decrypt``: FLARE TenSEAL contexts for the simulator, and decrypting the
encrypted global model of an HE job at a site.

Examples::

    fedseg he-context --workspace /tmp/ws            # then: nvflare simulator jobs/fedgs_lits_he -w /tmp/ws -n 4 -t 4
    fedseg he-decrypt --model RUN/results/global_model_encrypted.pt \\
        --context SITE_WORKSPACE/startup/client_context.tenseal --out global_model.pt

``he-context`` writes ``WS/startup/server_context.tenseal`` (no secret key) and ``WS/startup/client_context.tenseal``
(the secret key every site shares) with FLARE's own provisioning HEBuilder (CKKS, symmetric encryption, relin keys;
default parameters: polynomial degree 8192, coefficient moduli 60 40 40 bits, scale 2^40). ``nvflare simulator``
copies ``WS/startup`` into every participant's startup folder, where the HE filters look for them. POC
(``nvflare poc prepare -he``) and provisioned systems (HEBuilder in project.yml) make their own; do not copy these
files into a provisioned (secure) kit, whose contexts must be signed by the provisioning.

``he-decrypt`` reads ``results/global_model_encrypted.pt`` of an HE run (or the persistor's checkpoint
``app_server/FL_global_model.pt``), decrypts it with a site's context and writes a plaintext state dict (float32
tensors in their model shapes) that ``fedseg evaluate --model`` and ``fedseg predict --model-file`` load.
"""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "he-context", help="write FLARE TenSEAL contexts (server + client) into WS/startup for nvflare simulator",
        description="Write WS/startup/server_context.tenseal and WS/startup/client_context.tenseal exactly like "
                    "FLARE's provisioning HEBuilder; `nvflare simulator JOB -w WS` copies them to every participant.")
    p.add_argument("--workspace", required=True, type=Path,
                   help="the simulator workspace (the -w of nvflare simulator)")
    p.add_argument("--force", action="store_true", help="overwrite existing context files")
    p.add_argument("--poly-modulus-degree", type=int, default=8192, help="CKKS polynomial degree (default 8192)")
    p.add_argument("--coeff-mod-bit-sizes", type=int, nargs="+", default=[60, 40, 40],
                   help="bit sizes of the coefficient moduli (default 60 40 40)")
    p.add_argument("--scale-bits", type=int, default=40, help="log2 of the CKKS scale (default 40)")
    p.add_argument("--job", default="jobs/fedgs_lits_he", help="job folder named in the printed simulator command")
    p.set_defaults(func=run_context)

    d = subparsers.add_parser(
        "he-decrypt", help="decrypt the encrypted global model of an HE run with a site's client context",
        description="Decrypt results/global_model_encrypted.pt (or app_server/FL_global_model.pt) of an HE job with "
                    "a site's client_context.tenseal and write a plaintext state dict for fedseg evaluate/predict.")
    d.add_argument("--model", required=True, type=Path,
                   help="results/global_model_encrypted.pt of an HE run, or the persistor's FL_global_model.pt")
    d.add_argument("--context", required=True, type=Path,
                   help="a site's client context: <site workspace>/startup/client_context.tenseal")
    d.add_argument("--out", required=True, type=Path, help="plaintext state dict to write (e.g. global_model.pt)")
    d.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    d.set_defaults(func=run_decrypt)


def run_context(args) -> int:
    from fedseg.errors import CommandError
    from fedseg.flare.he import CLIENT_CONTEXT, SERVER_CONTEXT, context_fingerprint, make_contexts, read_context

    startup = Path(args.workspace) / "startup"
    targets = {SERVER_CONTEXT: startup / SERVER_CONTEXT, CLIENT_CONTEXT: startup / CLIENT_CONTEXT}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not args.force:
        raise CommandError(f"{', '.join(existing)} already exist; pass --force to replace them (every site must then "
                           "use the new client context, and an encrypted model of an earlier run needs the old one)")
    if args.poly_modulus_degree <= 0 or args.poly_modulus_degree & (args.poly_modulus_degree - 1):
        raise CommandError(f"--poly-modulus-degree must be a power of two (e.g. 8192), got {args.poly_modulus_degree}")
    try:
        server, client = make_contexts(args.poly_modulus_degree, args.coeff_mod_bit_sizes, args.scale_bits)
    except (ValueError, RuntimeError, TypeError) as e:
        raise CommandError(f"TenSEAL refused the parameters (degree {args.poly_modulus_degree}, moduli "
                           f"{args.coeff_mod_bit_sizes}, scale 2^{args.scale_bits}): {e}") from e
    startup.mkdir(parents=True, exist_ok=True)
    targets[SERVER_CONTEXT].write_bytes(server)
    targets[CLIENT_CONTEXT].write_bytes(client)
    targets[CLIENT_CONTEXT].chmod(0o600)  # the sites' secret key: readable by its owner only
    fp = context_fingerprint(read_context(targets[CLIENT_CONTEXT], role="client"))
    read_context(targets[SERVER_CONTEXT], role="server")
    print(f"wrote {targets[SERVER_CONTEXT]} (server: no secret key, {len(server)} bytes)")
    print(f"wrote {targets[CLIENT_CONTEXT]} (sites: shared secret key, {len(client)} bytes)")
    print(f"CKKS degree {args.poly_modulus_degree}, moduli {args.coeff_mod_bit_sizes}, scale 2^{args.scale_bits}; "
          f"params {fp['params'][:12]}, key id {fp['key_id'][:12]}")
    print("nvflare simulator copies this startup folder to every participant. Run:")
    print(f"  nvflare simulator {args.job} -w {args.workspace} -n 4 -t 4")
    return 0


def run_decrypt(args) -> int:
    import torch

    from fedseg.errors import CommandError, FedsegError
    from fedseg.flare.he import decrypt_model_file, read_context

    if args.out.exists() and not args.force:
        raise CommandError(f"{args.out} already exists; pass --force to overwrite it")
    try:
        ctx = read_context(args.context, role="client")
        state = decrypt_model_file(args.model, ctx, context_name=str(args.context))
    except FedsegError as e:
        raise CommandError(str(e)) from e
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    n = sum(int(t.numel()) for t in state.values())
    print(f"decrypted {len(state)} tensors ({n} values) of {args.model} with {args.context} -> {args.out}")
    print(f"  evaluate it: fedseg evaluate --model {args.out} --job JOB [--part val --site SITE]")
    return 0
