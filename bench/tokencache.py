"""`python -m bench.tokencache [--baseline DIR]`: what a new token costs once the cache is full.

The BFF remembers verified tokens per process (`bff_token_cache`, 100,000 by
default). A sale with more buyers than that fills the cache with no attacker,
and from then on every new token also pays for making room. This measures,
with the cache empty and with it full:

- `insert`: one entry added to the cache (Verifier._remember), alone;
- `new token`: a whole first request's verification (Verifier.caller of a token
  never seen: header, key, RS256 signature, claims, cache);
- where a new token's time goes, piece by piece (bearer header and hash, header
  and signature decoding, key lookup, the RSA verification, payload, claims,
  cache and shared-table writes), beside PyJWT's decode of the same token: the
  verifier's cost above the RSA verification is what a cheaper path can cut.

Each tree is measured in a process of its own whose PYTHONPATH is that tree, so
`--baseline /path/to/another/checkout` runs the same measurement on that
checkout's engine (this file is run by path there: it imports nothing of the
bench package). Every figure is this process's CPU time, not wall time, and the
least of `--rounds` rounds: the machine may be shared. Written to
bench/results/tokencache-<time>.json and .md; read it as ratios, full against
empty and this tree against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .resultfiles import write_result

HERE = Path(__file__).resolve().parent.parent
STATES = ("empty", "full")
PIECES = ("bearer_and_hash", "header_and_signature_base64", "key_lookup", "rsa_verify",
          "payload_parse", "claims_checks", "cache_insert", "shared_table_put",
          "shared_table_get", "pyjwt_decode")


def _measure(size: int, inserts: int, tokens: int, rounds: int) -> dict[str, Any]:
    """In the child: the costs of the engine found on this process's path, in us."""
    from engine.config import Settings
    from engine.gate.auth import Caller, KeySet, Verifier
    from engine.gate.devkeys import DevIssuer, init_keys

    base = Settings()
    directory = Path(tempfile.mkdtemp(prefix="seckill-tokencache-"))
    jwks, private = init_keys(directory)
    settings = base.replace(bff_jwks=str(jwks), bff_token_cache=size)
    issuer = DevIssuer(private, issuer=base.bff_jwt_issuer, audience=base.bff_jwt_audience)
    keyset = KeySet(settings)
    keyset.load()
    caller = Caller(1, time.time() + 3600)
    digests = iter(range(1, 1 << 62))
    users = iter(range(1, 1 << 62))

    def fresh(full: bool) -> Verifier:
        verifier = Verifier(settings, keyset)
        while full and len(verifier.cache) < size:
            verifier._remember(next(digests).to_bytes(16, "big"), caller)
        return verifier

    def insert_us(verifier: Verifier) -> float:
        started = time.process_time()
        for _ in range(inserts):
            verifier._remember(next(digests).to_bytes(16, "big"), caller)
        return (time.process_time() - started) / inserts * 1e6

    async def new_token_us(verifier: Verifier) -> float:
        headers = [f"Bearer {issuer.token(next(users), 3600)}" for _ in range(tokens)]
        started = time.process_time()
        for header in headers:
            await verifier.caller(header)
        return (time.process_time() - started) / tokens * 1e6

    out: dict[str, Any] = {"insert_us": {}, "new_token_us": {}}
    for state in STATES:
        full = state == "full"
        out["insert_us"][state] = min(insert_us(fresh(full)) for _ in range(rounds))
        out["new_token_us"][state] = min(asyncio.run(new_token_us(fresh(full)))
                                         for _ in range(rounds))
    out["cache_size_after"] = len(fresh(True).cache)
    out["breakdown_us"] = _breakdown(settings, keyset, issuer, tokens, rounds)
    return out


def _breakdown(settings: Any, keyset: Any, issuer: Any, tokens: int, rounds: int
               ) -> dict[str, float]:
    """Where a new token's microseconds go, piece by piece, in the order the verifier
    takes them; PyJWT's decode of the same token apart (what the verifier called up to
    issue 22). Pieces this tree's verifier does not have are left out."""
    import jwt

    from engine.gate import auth

    verifier = auth.Verifier(settings, keyset)
    headers = [f"Bearer {issuer.token(n + 1, 3600)}" for n in range(tokens)]
    raw = [h[7:].encode() for h in headers]
    key = next(iter(keyset.keys.values()))

    def timed(step: Any, items: list[Any]) -> float:
        best = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            for item in items:
                step(item)
            best = min(best, (time.process_time() - started) / len(items) * 1e6)
        return best

    out = {"pyjwt_decode": timed(lambda t: jwt.decode(
        t, key.key, algorithms=["RS256"], audience=settings.bff_jwt_audience,
        issuer=settings.bff_jwt_issuer, options={"require": auth.REQUIRED_CLAIMS}), raw)}
    if not hasattr(auth, "_segments"):
        return out
    segments = [auth._segments(t) for t in raw]
    rsa = auth.ALGORITHMS["RS256"]
    claims = [auth._claims(si) for si, _, _ in segments]
    caller = auth.Caller(1, time.time() + 3600)
    digests = [auth._digest(t) for t in raw]

    def checks(c: dict[str, Any]) -> None:
        verifier._check_claims(c)
        auth.Caller(auth._user_id(c["sub"]), verifier._expiry(c))

    out.update({
        "bearer_and_hash": timed(lambda h: auth._digest(auth._bearer(h)), headers),
        "header_and_signature_base64": timed(auth._segments, raw),
        "key_lookup": timed(lambda s: verifier._lookup(s[1].get("kid", "")), segments),
        "rsa_verify": timed(lambda s: rsa.verify(s[0], rsa.prepare_key(key.key), s[2]),
                            segments),
        "payload_parse": timed(lambda s: auth._claims(s[0]), segments),
        "claims_checks": timed(checks, claims),
        "cache_insert": timed(lambda d: verifier._remember(d, caller, share=False), digests),
    })
    from engine.gate.verifiedtokens import VerifiedTokens, shared_table

    with shared_table(len(digests)):
        table = VerifiedTokens.attach()
        assert table is not None
        out["shared_table_put"] = timed(lambda d: table.put(d, 1, caller.expires), digests)
        out["shared_table_get"] = timed(table.get, digests)
        table.close()

    return out


def measure_tree(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The costs of the engine in `tree`, measured in a process of its own."""
    params = json.dumps({"size": args.size, "inserts": args.inserts, "tokens": args.tokens,
                         "rounds": args.rounds})
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, __file__, "--child", params], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {tree} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def table(doc: dict[str, Any]) -> str:
    size = f"{doc['size']:,}"
    lines = [f"| tree | insert, empty (us) | insert, {size} full (us) | full / empty | "
             f"new token, empty (us) | new token, full (us) | full / empty |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in doc["trees"].items():
        ins, tok = r["insert_us"], r["new_token_us"]
        lines.append(f"| {name} | {ins['empty']:.2f} | {ins['full']:.2f} | "
                     f"{ins['full'] / ins['empty']:.1f}x | {tok['empty']:.0f} | "
                     f"{tok['full']:.0f} | {tok['full'] / tok['empty']:.2f}x |")
    if "baseline" in doc["trees"]:
        b, t = doc["trees"]["baseline"], doc["trees"]["this tree"]
        insert = b["insert_us"]["full"] / t["insert_us"]["full"]
        token = b["new_token_us"]["full"] / t["new_token_us"]["full"]
        empty = t["new_token_us"]["empty"] / b["new_token_us"]["empty"]
        lines += ["", f"Cache full: an insert costs {insert:,.0f}x less in this tree than in "
                  f"the baseline, a new token {token:.1f}x less. Cache empty: a new token "
                  f"costs {empty:.2f}x the baseline's."]
    lines += ["", "Where a new token's time goes (us, this process's CPU, least of the rounds):",
              "", "| tree | " + " | ".join(PIECES) + " |",
              "|---|" + "---:|" * len(PIECES)]
    for name, r in doc["trees"].items():
        pieces = r.get("breakdown_us", {})
        lines.append(f"| {name} | " + " | ".join(
            f"{pieces[p]:.1f}" if p in pieces else "-" for p in PIECES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tokencache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="another checkout to measure the same way")
    p.add_argument("--size", type=int, default=100_000, help="bff_token_cache")
    p.add_argument("--inserts", type=int, default=500, help="inserts timed per round")
    p.add_argument("--tokens", type=int, default=200, help="new tokens timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(**json.loads(args.child))))
        return 0
    trees = {"this tree": HERE}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    doc: dict[str, Any] = {"size": args.size, "inserts": args.inserts, "tokens": args.tokens,
                           "rounds": args.rounds, "trees": {}, "paths": {}}
    for name, tree in trees.items():
        print(f"measuring {name} ({tree}) ...", flush=True)
        doc["trees"][name] = measure_tree(tree, args)
        doc["paths"][name] = str(tree)
    text = table(doc)
    path = write_result("tokencache", doc, text)
    print(text)
    print(f"written: {path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
