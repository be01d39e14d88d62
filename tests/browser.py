"""Render a built HTML page in headless Chromium and measure what a reader at 1400 px would see.

`check_page` copies the page next to itself (so its relative CSS, JS and image paths resolve),
injects two scripts, loads the copy with ``chromium --headless --dump-dom`` and reads back the
JSON report the second script writes into the DOM. No pip dependency: Debian's ``chromium``.

- The first element of <head> records uncaught JavaScript errors: ``error`` events that reach
  window without capture (runtime exceptions; a failed <script>/<img> load fires a
  non-bubbling error on its element, so an offline CDN such as MathJax's does not count) and
  ``unhandledrejection``.
- The end of <body>, once ``load`` has fired (every image loaded or failed) and the theme's own
  scripts have had SETTLE_MS, opens every <details> in the article (hidden cell inputs and
  dropdowns: a reader can open them) and measures, inside the article
  (``article.bd-article``, else ``main#main-content``):
  * overflow: for each visible block (paragraphs, list items, tables and their wrappers,
    math, notebook outputs, ``pre``), how far its content passes its own box
    (``scrollWidth - clientWidth``: cut off behind a scrollbar or spilling out) or its box
    passes the article's edges (``getBoundingClientRect``). Over OVERFLOW_TOLERANCE_PX (1 px:
    scrollWidth and clientWidth are rounded to whole pixels, so sub-pixel layouts can differ by
    1 px without anything being hidden) it is reported with a category (prose, math, table,
    text output, code input, code block), a short text and the pixels. Descendants of a
    reported element are not reported again. The page itself: the document's
    ``scrollWidth`` beyond its ``clientWidth`` (the viewport less any scrollbar).
  * figures: every <img>, its natural (pixel) width, its shown width and their ratio.
  Where MathJax loads (GitHub; not offline), the measuring waits for its typesetting.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

WIDTH, HEIGHT = 1400, 4000        # the window a desktop reader has; tall, so layout is final
SETTLE_MS = 500                   # after `load`, so the theme's deferred scripts have run
VIRTUAL_TIME_BUDGET_MS = 5000     # virtual time: timers run at once, the budget caps the wait
OVERFLOW_TOLERANCE_PX = 1         # see the module docstring: rounding of scroll/client widths
# A figure shown below 70% of its pixel width shrinks its text with it: a stored figure's labels
# are fixed in pixels (e.g. matplotlib's 10 pt at 100 dpi: a ~14 px font), and scaled by under
# 0.7 they fall below ~10 px, past reading size.
MIN_FIGURE_RATIO = 0.70
MARK = "dsm-browser-check"
# Code boxes (notebook inputs, literal blocks): `offenders(code=False)` leaves them out.
CODE_CATEGORIES = ("code input", "code block")
COPY_SUFFIX = ".browsercheck.html"

_HEAD = (  # one line: the page's own line numbers (in error messages) stay as built
    "<script>/* dsm browser check: uncaught errors */ window.__dsmErrors = [];"
    " window.addEventListener('error', function (e) { __dsmErrors.push(String(e.message) + ' ('"
    " + String(e.filename || '?').split('/').pop() + ':' + e.lineno + ')'); });"
    " window.addEventListener('unhandledrejection', function (e) { var r = e.reason;"
    " __dsmErrors.push('unhandled rejection: ' + (r && r.message ? r.message : String(r))); });"
    "</script>")

_BODY = """<pre id="%(mark)s" hidden></pre><script>/* dsm browser check: measure */
(function () {
  function short(s, n) { s = s.replace(/\\s+/g, ' ').trim(); return s.length > n ? s.slice(0, n) + '…' : s; }
  function category(el) {
    if (el.closest('.cell_input')) return 'code input';
    if (el.closest('.cell_output')) return el.matches('table') || el.querySelector('table') ? 'table' : 'text output';
    if (el.closest('pre')) return 'code block';
    if (el.matches('table, .table-wrapper, .pst-scrollable-table-container') || el.querySelector('table')) return 'table';
    if (el.matches('div.math, mjx-container') || el.querySelector('mjx-container')) return 'math';
    return 'prose';
  }
  function what(el) {
    var name = el.tagName.toLowerCase() + (el.classList.length ? '.' + el.classList[0] : '');
    var text = el.innerText || el.textContent;  // innerText: table cells apart, as shown
    if (el.tagName === 'PRE') {  // the widest line is the one that overflows
      var lines = text.split('\\n'), longest = '';
      lines.forEach(function (l) { if (l.length > longest.length) longest = l; });
      return name + ' longest line (' + longest.length + ' chars): ' + short(longest, 80);
    }
    return name + ': ' + short(text, 80);
  }
  function measure() {
    var art = document.querySelector('article.bd-article') || document.querySelector('main#main-content') || document.body;
    art.querySelectorAll('details').forEach(function (d) { d.open = true; });
    var a = art.getBoundingClientRect(), de = document.documentElement;
    var report = {errors: window.__dsmErrors || ['the error recorder did not run'],
                  page: {scrollWidth: de.scrollWidth, clientWidth: de.clientWidth, innerWidth: innerWidth},
                  article: {left: a.left, right: a.right, width: a.width}, overflow: [], images: []};
    var reported = [];
    art.querySelectorAll('p, li, dt, dd, blockquote, h1, h2, h3, h4, h5, h6, table, .table-wrapper, ' +
                         '.pst-scrollable-table-container, div.math, mjx-container, .output, pre, figure, .admonition')
      .forEach(function (el) {
        if (reported.some(function (r) { return r.contains(el); })) return;
        var r = el.getBoundingClientRect();
        if (!r.width || getComputedStyle(el).display === 'inline') return;  // hidden, or inline: no box width
        var inside = el.scrollWidth - el.clientWidth, outside = Math.max(r.right - a.right, a.left - r.left);
        var px = Math.max(inside, outside);
        if (px > %(tol)s) {
          reported.push(el);
          report.overflow.push({category: category(el), what: what(el), px: Math.round(px),
                                scrollWidth: el.scrollWidth, clientWidth: el.clientWidth,
                                pastArticle: Math.round(outside)});
        }
      });
    art.querySelectorAll('img').forEach(function (img) {
      var r = img.getBoundingClientRect();
      report.images.push({src: img.getAttribute('src'), local: img.src.indexOf('file:') === 0,
                          complete: img.complete, natural: img.naturalWidth, shown: r.width,
                          visible: r.width > 0 || r.height > 0,
                          ratio: img.naturalWidth ? r.width / img.naturalWidth : null});
    });
    var out = document.getElementById('%(mark)s');
    out.textContent = JSON.stringify(report);
  }
  function later() { setTimeout(function () {
    try { measure(); } catch (e) { document.getElementById('%(mark)s').textContent =
      JSON.stringify({fatal: 'the measuring script failed: ' + e}); }
  }, %(settle)s); }
  function typeset() {  // MathJax (where the CDN is reachable) typesets after load: wait for it
    var mj = window.MathJax && window.MathJax.startup && window.MathJax.startup.promise;
    if (mj) mj.then(later, later); else later();
  }
  if (document.readyState === 'complete') typeset(); else window.addEventListener('load', typeset);
})();
</script>""" % {"mark": MARK, "tol": OVERFLOW_TOLERANCE_PX, "settle": SETTLE_MS}


def find_chromium() -> str | None:
    """$DSM_LITE_CHROMIUM, else the first of chromium, chromium-browser, google-chrome on PATH."""
    if os.environ.get("DSM_LITE_CHROMIUM"):
        return os.environ["DSM_LITE_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def chromium_command(chromium: str, url: str, profile: str) -> list[str]:
    """The headless command line: a fresh profile, no GPU, 1400 px wide, the DOM on stdout."""
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}", f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
            "--dump-dom", url]


def instrument(text: str) -> str:
    """The page with the error recorder first in <head> and the measuring script last in <body>."""
    head = re.search(r"<head[^>]*>", text, flags=re.I)
    body = text.lower().rfind("</body>")
    if head is None or body < 0:
        raise ValueError("the page has no <head> or no </body>")
    text = text[:body] + _BODY + text[body:]
    return text[:head.end()] + _HEAD + text[head.end():]


def check_page(page: Path, chromium: str, timeout: float = 60) -> dict:
    """Render ``page`` (an .html file) in headless Chromium; return the report the page wrote.

    The instrumented copy sits beside the page, as ``<name>.browsercheck.html``, and is deleted
    afterwards. Raises RuntimeError when Chromium fails or no report comes back.
    """
    page = Path(page).resolve()
    copy = page.with_name(page.stem + COPY_SUFFIX)
    copy.write_text(instrument(page.read_text(encoding="utf-8")), encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory(prefix="dsm-chromium-") as profile:
            proc = subprocess.run(chromium_command(chromium, copy.as_uri(), profile),
                                  capture_output=True, text=True, timeout=timeout)
    finally:
        copy.unlink(missing_ok=True)
    m = re.search(rf'<pre id="{MARK}"[^>]*>(.*?)</pre>', proc.stdout, flags=re.S)
    if proc.returncode != 0 or m is None or not m.group(1).strip():
        raise RuntimeError(f"{page.name}: no report from Chromium (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    report = json.loads(html.unescape(m.group(1)))
    report["errors"] = [e.replace(copy.name, page.name) for e in report.get("errors", [])]
    if "fatal" in report:
        raise RuntimeError(f"{page.name}: {report['fatal']}")
    return report


def offenders(report: dict, code: bool = True) -> list[str]:
    """Every failure in a report, one readable line each; ``code=False`` leaves out CODE_CATEGORIES."""
    out = [f"JS error: {e}" for e in report["errors"]]
    page = report["page"]
    if page["scrollWidth"] > page["clientWidth"] + OVERFLOW_TOLERANCE_PX:
        out.append(f"page: scrolls sideways, {page['scrollWidth']} px wide in a "
                   f"{page['clientWidth']} px viewport (+{page['scrollWidth'] - page['clientWidth']} px)")
    for o in report["overflow"]:
        if code or o["category"] not in CODE_CATEGORIES:
            out.append(f"{o['category']}: {o['what']} overflows by {o['px']} px")
    for img in report["images"]:
        if not img["visible"]:
            continue
        if not img["natural"]:
            if img["local"]:  # a remote image (a badge) cannot load offline: not measurable here
                out.append(f"figure: {img['src']} did not load")
        elif img["ratio"] < MIN_FIGURE_RATIO:
            out.append(f"figure: {img['src']} shown {img['shown']:.0f} px of its {img['natural']} px "
                       f"(ratio {img['ratio']:.2f} < {MIN_FIGURE_RATIO})")
    return out
