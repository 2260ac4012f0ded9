#!/usr/bin/env python3
"""Benchmark of `indiepm inject` on a generated 10,000-page site.

Measures in one run, side by side, each on a fresh copy of the same tree:
`cp -r` of the tree, `indiepm inject` (release build), the sed one-liner a
user would otherwise write, and the second (idempotent) inject run; with
the peak RSS of each from /usr/bin/time. Prints medians and the ratios the
issue sets as targets. Run it through bench/inject.sh (which builds the
release binary first).

The site is deterministic: pages of 2 to 20 KB with a realistic head
(meta tags, Open Graph, stylesheets, preloads, scripts), 10 sections of
1,000 pages in page-N/index.html folders, plus CSS and image files that
inject must leave alone.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ENDPOINT = "https://pm.example.org/pm"


class Lcg:
    """A tiny deterministic PRNG, so the site is the same on every Python."""

    def __init__(self, seed):
        self.state = seed

    def next(self, n):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return (self.state >> 33) % n


WORDS = (
    "static site private message endpoint discovery link header page server "
    "build generator markdown template partial feed notes travel photo garden "
    "recipe coffee bicycle weekend reading letter friend reply thread inbox "
    "café naïve 東京 résumé"
).split()


def page(rng, section, n, size):
    title = " ".join(WORDS[rng.next(len(WORDS))] for _ in range(4)).title()
    url = f"https://alice.example.org/{section}/page-{n}/"
    head = f"""<!DOCTYPE html>
<html lang="en-us" dir="ltr">
<head>
  <meta charset="utf-8">
  <meta http-equiv="X-UA-Compatible" content="IE=edge">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} | Alice's notes</title>
  <meta name="description" content="Notes about {title.lower()} and other things, written on a quiet afternoon.">
  <meta name="author" content="Alice Example">
  <link rel="canonical" href="{url}">
  <meta property="og:title" content="{title}">
  <meta property="og:type" content="article">
  <meta property="og:url" content="{url}">
  <meta property="og:image" content="https://alice.example.org/images/cover-{n % 50}.jpg">
  <meta name="twitter:card" content="summary_large_image">
  <link rel="preload" href="/fonts/inter-var.woff2" as="font" type="font/woff2" crossorigin>
  <link rel="stylesheet" href="/css/main.min.{n % 7}a3f9c.css" integrity="sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=">
  <link rel="alternate" type="application/rss+xml" href="/{section}/index.xml" title="Alice's notes">
  <link rel="icon" href="/favicon.ico">
  <link rel="me" href="https://social.example/@alice">
  <script defer src="/js/site.min.js"></script>
  <style>:root{{--accent:#{rng.next(0xffffff):06x}}}body{{max-width:42rem;margin:auto}}</style>
</head>
<body class="section-{section}">
  <header class="site-header"><a href="/" class="brand">Alice's notes</a>
    <nav><a href="/posts/">Posts</a> <a href="/about/">About</a> <a href="/tags/">Tags</a></nav>
  </header>
  <main>
    <article class="post">
      <h1>{title}</h1>
      <p class="meta"><time datetime="2024-{1 + n % 12:02d}-{1 + n % 28:02d}">{1 + n % 28} March 2024</time></p>
"""
    tail = """    </article>
  </main>
  <footer class="site-footer"><p>&copy; 2024 Alice Example &middot; <a href="/index.xml">RSS</a></p></footer>
</body>
</html>
"""
    parts = [head]
    length = len(head.encode()) + len(tail)
    while length < size:
        words = " ".join(WORDS[rng.next(len(WORDS))] for _ in range(20 + rng.next(60)))
        para = f"      <p>{words.capitalize()} &amp; <a href=\"/{section}/page-{rng.next(1000)}/\">more</a>.</p>\n"
        parts.append(para)
        length += len(para.encode())
    parts.append(tail)
    return "".join(parts)


def generate(root, pages):
    rng = Lcg(20240601)
    sections = 10
    total = 0
    for i in range(pages):
        section = f"section-{i % sections}"
        d = os.path.join(root, section, f"page-{i // sections}")
        os.makedirs(d, exist_ok=True)
        size = 2048 + rng.next(18 * 1024)
        text = page(rng, section, i // sections, size)
        with open(os.path.join(d, "index.html"), "w", encoding="utf-8") as f:
            f.write(text)
        total += len(text.encode())
    os.makedirs(os.path.join(root, "css"), exist_ok=True)
    for j in range(7):
        with open(os.path.join(root, "css", f"main.min.{j}a3f9c.css"), "w") as f:
            f.write("body{margin:0}\n" * 200)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for j in range(50):
        with open(os.path.join(root, "images", f"cover-{j}.jpg"), "wb") as f:
            f.write(bytes(rng.next(256) for _ in range(4096)))
    return total


def timed(cmd, cwd=None):
    """Runs cmd under /usr/bin/time; returns (seconds, peak RSS in KiB)."""
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name] + cmd, cwd=cwd,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if res.returncode != 0:
            sys.exit(f"{cmd[0]} failed ({res.returncode}): {res.stderr.decode()[-500:]}")
        return elapsed, int(rss.read().strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/indiepm")
    ap.add_argument("--pages", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", help="work folder (default: a temp folder)")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    work = tempfile.mkdtemp(prefix="indiepm-bench-", dir=args.dir)
    try:
        src = os.path.join(work, "site")
        t = time.perf_counter()
        total = generate(src, args.pages)
        print(f"site: {args.pages} pages, {total / 1e6:.1f} MB of HTML, generated in "
              f"{time.perf_counter() - t:.1f} s; {args.runs} runs each on fresh copies "
              f"(cpus: {os.cpu_count()})")
        results = {k: [] for k in ("cp", "inject", "sed", "inject2")}
        rss = {k: [] for k in results}
        sed = ("find {d} -name '*.html' -exec sed -i "
               f"'s#</head>#<link rel=\"pm\" href=\"{ENDPOINT}\"></head>#' {{{{}}}} +")
        for i in range(args.runs):
            a, b, c = (os.path.join(work, f"{x}{i}") for x in "abc")
            subprocess.run(["cp", "-r", src, a], check=True)
            subprocess.run(["cp", "-r", src, c], check=True)
            subprocess.run(["sync"], check=True)
            for key, cmd in (
                ("cp", ["cp", "-r", src, b]),
                ("inject", [binary, "inject", a, "--endpoint", ENDPOINT]),
                ("inject2", [binary, "inject", a, "--endpoint", ENDPOINT]),
                ("sed", ["sh", "-c", sed.format(d=c)]),
            ):
                secs, kib = timed(cmd)
                results[key].append(secs)
                rss[key].append(kib)
                subprocess.run(["sync"], check=True)
            # The sed one-liner and inject must produce the same pages here
            # (every generated page has exactly one </head>).
            probe = os.path.join("section-3", "page-7", "index.html")
            with open(os.path.join(a, probe), "rb") as x, open(os.path.join(c, probe), "rb") as y:
                assert x.read() == y.read(), "inject and sed disagree"
            for d in (a, b, c):
                shutil.rmtree(d)
        med = {k: statistics.median(v) for k, v in results.items()}
        peak = {k: max(v) for k, v in rss.items()}
        names = {"cp": "cp -r", "inject": "indiepm inject (first run)",
                 "sed": "find ... -exec sed -i ... {} +", "inject2": "indiepm inject (second run)"}
        print(f"{'':32} {'median':>9} {'min':>8} {'max':>8} {'peak RSS':>10}")
        for k in ("cp", "inject", "sed", "inject2"):
            v = results[k]
            print(f"{names[k]:32} {med[k]:8.3f}s {min(v):7.3f}s {max(v):7.3f}s {peak[k] / 1024:8.1f} MB")
        checks = [
            ("first inject / cp -r", med["inject"] / med["cp"], "<= 1.5", med["inject"] <= 1.5 * med["cp"]),
            ("first inject / sed", med["inject"] / med["sed"], "< 1", med["inject"] < med["sed"]),
            ("second inject / first", med["inject2"] / med["inject"], "<= 0.5", med["inject2"] <= 0.5 * med["inject"]),
        ]
        for name, ratio, target, ok in checks:
            print(f"{name:32} {ratio:8.2f}x  target {target:7} {'ok' if ok else 'MISSED'}")
        rss_ok = max(peak["inject"], peak["inject2"]) < 50 * 1024
        print(f"{'inject peak RSS':32} {max(peak['inject'], peak['inject2']) / 1024:8.1f} MB  "
              f"target < 50 MB {'ok' if rss_ok else 'MISSED'}")
        return 0 if all(c[3] for c in checks) and rss_ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
