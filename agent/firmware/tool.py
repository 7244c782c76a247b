"""``tools/keygen`` and ``tools/build-bundle`` (run as ``python -m agent.firmware.tool``).

``keygen --out DIR [--name NAME]`` writes ``NAME.pem`` (PKCS#8 private key, mode 0600:
keep it off the chargers) and ``NAME.pub`` (base64 of the raw 32-byte public key) and
prints the ``[firmware] public_key`` line for the charger config.

``build-bundle --version X --key PRIVATE.pem --out DIR [--source ROOT] [--payload FILE]
[--deps-dir WHEELS] [--base-url URL]`` builds the wheel from the source tree (default:
this checkout) with version X, wraps it into ``DIR/charger-agent-X.bundle.tar.gz``, signs
it (``.sig`` next to it) and prints JSON: the bundle path, its sha256, the signature and
ready ``firmware_upgrade`` params (with ``url`` when ``--base-url`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.firmware.bundle import generate_keypair, private_key_pem, public_key_b64

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private_path = out / f"{args.name}.pem"
    public_path = out / f"{args.name}.pub"
    if private_path.exists() and not args.force:
        print(f"keygen: {private_path} exists (use --force to replace it)", file=sys.stderr)
        return 2
    private, public = generate_keypair()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(private))
    os.chmod(private_path, 0o600)
    public_path.write_text(public_key_b64(public) + "\n", encoding="ascii")
    print(f"private key: {private_path} (keep it secret, off the chargers)")
    print(f"public key:  {public_path}")
    print("charger config:")
    print("[firmware]")
    print(f'public_key = "{public_key_b64(public)}"')
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from agent.firmware.build import BuildError, build_bundle
    from agent.firmware.bundle import BundleError

    deps = sorted(Path(args.deps_dir).glob("*.whl")) if args.deps_dir else []
    try:
        result = build_bundle(
            version=args.version,
            key=args.key,
            out_dir=args.out,
            source=None if args.payload else (args.source or ROOT),
            payload=args.payload,
            deps=deps,
        )
    except (BuildError, BundleError) as exc:
        print(f"build-bundle: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "bundle": str(result.bundle),
                "signature_file": str(result.signature_file),
                "sha256": result.sha256,
                "signature": result.signature,
                "params": result.params(args.base_url),
            },
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent.firmware.tool", description="firmware bundle tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("keygen", help="write an ed25519 signing keypair")
    p.add_argument("--out", required=True, help="directory for NAME.pem and NAME.pub")
    p.add_argument("--name", default="firmware-signing")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("build-bundle", help="build and sign an update bundle")
    p.add_argument("--version", required=True, help="PEP 440 version of the new release, e.g. 0.2.0")
    p.add_argument("--key", required=True, help="private key (PEM) from tools/keygen")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--source", help=f"project source tree (default {ROOT})")
    p.add_argument("--payload", help="prebuilt payload instead of building (e.g. a RAUC .raucb)")
    p.add_argument("--deps-dir", help="directory of dependency wheels to ship in the bundle")
    p.add_argument("--base-url", help="URL the bundle will be served under (for the printed params)")
    p.set_defaults(func=cmd_build)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
