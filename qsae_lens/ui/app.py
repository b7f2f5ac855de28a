"""`qsae ui`: a local page that steers one SAE latent at two precisions side by side.

Why the standard library's ``http.server`` and not Gradio: ``pip install --dry-run gradio`` against
this environment's pins resolves (no conflict) but adds 16 packages (gradio 6.31, fastapi,
starlette, uvicorn, pillow, pydub, orjson, ...), Gradio's default theme fetches fonts from a CDN and
it sends analytics unless ``GRADIO_ANALYTICS_ENABLED`` is off. The page needs one HTML document and
two JSON endpoints, so ~150 lines of stdlib server with inline assets give "localhost only, no
outside requests" by construction, and no ``[ui]`` extra is needed at all.

Endpoints: ``GET /`` the page; ``GET /api/latents?q=TEXT`` latents whose top tokens contain TEXT;
``POST /api/generate`` JSON ``{prompt, latent, strength, precisions: [a, b], max_new_tokens, mode}``
-> ``{"outputs": {precision: {"steered": str, "unsteered": str}}}``.
"""

from __future__ import annotations

import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
from torch import Tensor

from qsae_lens.interventions.steering import steer_feature, typical_max_activation

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class SteeringApp:
    """The state behind the page: models by precision, one SAE, per-latent top tokens and examples.

    ``models``: precision -> model (same checkpoint). ``sae``: the SAE whose latents are steered
    (its hook from ``cfg.metadata.hook_name``). ``example_tokens``: optional ``Tensor[n, pos]``;
    when given, each latent's typical max activation (strength unit) and top examples come from it.
    Generation is greedy, so strength 0 reproduces the unsteered text exactly.
    """

    def __init__(self, models: dict[str, Any], sae: Any, *, example_tokens: Tensor | None = None,
                 n_top_tokens: int = 8, n_examples: int = 3) -> None:
        if not models:
            raise ValueError("models is empty: pass {precision: model}.")
        self.models, self.sae = models, sae
        self.lock = threading.Lock()  # one generation at a time: models are not thread-safe
        first = next(iter(models.values()))
        self.tokenizer = first.tokenizer
        with torch.no_grad():
            logits = sae.W_dec.detach().float() @ first.W_U.float().to(sae.W_dec.device)  # [d_sae, d_vocab]
            top = logits.topk(n_top_tokens, dim=-1).indices.tolist()
        self.top_tokens = [[self.tokenizer.decode([t]) for t in row] for row in top]
        self.max_act: Tensor | None = None
        self.examples: list[list[str]] = [[] for _ in range(sae.cfg.d_sae)]
        if example_tokens is not None:
            self.max_act = typical_max_activation(first, sae, example_tokens)
            self.examples = self._top_examples(first, example_tokens, n_examples)

    @torch.no_grad()
    def _top_examples(self, model: Any, tokens: Tensor, n: int) -> list[list[str]]:
        """Per latent, the ``n`` highest-activating tokens with 8 tokens of left context (marked ⟦ ⟧)."""
        name = self.sae.cfg.metadata.hook_name
        _, cache = model.run_with_cache(tokens, names_filter=[name])
        codes = self.sae.encode(cache[name].to(self.sae.W_dec.dtype))  # [b, pos, d_sae]
        codes[tokens.to(codes.device) == model.tokenizer.bos_token_id] = 0
        flat = codes.reshape(-1, codes.shape[-1])
        vals, idx = flat.topk(min(n, flat.shape[0]), dim=0)  # [n, d_sae]
        out: list[list[str]] = []
        pos = tokens.shape[1]
        for latent in range(codes.shape[-1]):
            rows = []
            for v, i in zip(vals[:, latent].tolist(), idx[:, latent].tolist()):
                if v <= 0:
                    continue
                b, p = divmod(i, pos)
                ctx = self.tokenizer.decode(tokens[b, max(0, p - 8):p].tolist())
                rows.append(f"{ctx}⟦{self.tokenizer.decode([int(tokens[b, p])])}⟧ ({v:.2f})")
            out.append(rows)
        return out

    def latents(self, query: str = "", limit: int = 50) -> list[dict[str, Any]]:
        """Latents whose top tokens (or index) contain ``query``, with their top tokens and examples."""
        q = query.strip().lower()
        rows = []
        for i, toks in enumerate(self.top_tokens):
            if not q or q in str(i) or any(q in t.lower() for t in toks):
                rows.append({"latent": i, "top_tokens": toks, "examples": self.examples[i],
                             "max_activation": None if self.max_act is None else float(self.max_act[i])})
            if len(rows) >= limit:
                break
        return rows

    def generate(self, prompt: str, latent: int, strength: float, precisions: list[str], *,
                 max_new_tokens: int = 12, mode: str = "add") -> dict[str, dict[str, str]]:
        """Greedy generations with and without steering at each precision (strength in typical-max units
        when example tokens were given, raw activation units otherwise)."""
        unknown = [p for p in precisions if p not in self.models]
        if unknown:
            raise ValueError(f"unknown precision(s) {unknown}; loaded: {sorted(self.models)}.")
        if not 0 <= latent < self.sae.cfg.d_sae:
            raise ValueError(f"latent must be in 0..{self.sae.cfg.d_sae - 1}; got {latent}.")
        max_new_tokens = max(1, min(int(max_new_tokens), 64))
        scale = None if self.max_act is None else float(self.max_act[latent])
        out = {}
        with self.lock:
            for p in precisions:
                model = self.models[p]
                plain = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
                with steer_feature(model, self.sae, latent, strength, mode=mode,  # type: ignore[arg-type]
                                   max_activation=scale):
                    steered = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
                out[p] = {"steered": _strip_bos(steered, self.tokenizer),
                          "unsteered": _strip_bos(plain, self.tokenizer)}
        return out

    def page(self) -> str:
        """The page: inline CSS and JS only (no outside requests)."""
        options = "".join(f'<option value="{html.escape(p)}">{html.escape(p)}</option>' for p in self.models)
        names = list(self.models)
        right = names[1] if len(names) > 1 else names[0]
        return _PAGE.replace("{{OPTIONS}}", options).replace("{{LEFT}}", html.escape(names[0])).replace(
            "{{RIGHT}}", html.escape(right)).replace("{{D_SAE}}", str(self.sae.cfg.d_sae - 1)).replace(
            "{{UNIT}}", "× typical max activation" if self.max_act is not None else "activation units")


def _strip_bos(text: Any, tokenizer: Any) -> str:
    text = str(text)
    bos = tokenizer.bos_token or ""
    return text[len(bos):] if bos and text.startswith(bos) else text


def make_server(app: SteeringApp, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``app`` bound to a local address (port 0 = any free port: ``server.server_port``)."""
    if host not in LOCAL_HOSTS:
        raise ValueError(f"host must be local ({', '.join(LOCAL_HOSTS)}); got {host!r}: the page has no authentication.")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  -- quiet
            pass

        def _send(self, code: int, body: str, ctype: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Security-Policy", "default-src 'self' 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            if url.path == "/":
                self._send(200, app.page(), "text/html; charset=utf-8")
            elif url.path == "/api/latents":
                q = parse_qs(url.query).get("q", [""])[0]
                self._send(200, json.dumps({"latents": app.latents(q)}), "application/json")
            else:
                self._send(404, json.dumps({"error": "not found"}), "application/json")

        def do_POST(self) -> None:  # noqa: N802
            if urlparse(self.path).path != "/api/generate":
                self._send(404, json.dumps({"error": "not found"}), "application/json")
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                outs = app.generate(str(req.get("prompt", "")), int(req["latent"]), float(req["strength"]),
                                    list(req.get("precisions") or list(app.models)[:2]),
                                    max_new_tokens=int(req.get("max_new_tokens", 12)),
                                    mode=str(req.get("mode", "add")))
            except (KeyError, ValueError, TypeError) as err:
                self._send(400, json.dumps({"error": str(err)}), "application/json")
                return
            self._send(200, json.dumps({"outputs": outs}), "application/json")

    return ThreadingHTTPServer((host, port), Handler)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>qsae steering</title>
<style>body{font-family:sans-serif;margin:1.5em;max-width:1100px}.row{display:flex;gap:1em}
.col{flex:1;border:1px solid #ccc;padding:.6em;border-radius:6px}pre{white-space:pre-wrap}
label{margin-right:1em}#latents li{cursor:pointer}</style></head><body>
<h2>Steer one SAE latent at two precisions</h2>
<p>Generation is greedy; strength 0 gives the unsteered text. The fp32 model of the embedded
SmolLM2 is dequantized Q4_1.</p>
<div><label>Prompt <input id="prompt" size="60" value="def add(a, b):"></label></div>
<div><label>Left <select id="left">{{OPTIONS}}</select></label>
<label>Right <select id="right">{{OPTIONS}}</select></label>
<label>Mode <select id="mode"><option>add</option><option>clamp</option></select></label>
<label>New tokens <input id="ntok" type="number" value="12" min="1" max="64" style="width:4em"></label></div>
<div><label>Search latents by top token <input id="q"></label><button id="search">search</button>
<ul id="latents"></ul></div>
<div><label>Latent <input id="latent" type="number" value="0" min="0" max="{{D_SAE}}"></label>
<label>Strength ({{UNIT}}) <input id="strength" type="range" min="-10" max="10" step="0.5" value="2">
<span id="strength_val">2</span></label> <button id="generate">generate</button> <span id="status"></span></div>
<div id="examples"></div>
<div class="row"><div class="col"><h3 id="left_name">{{LEFT}}</h3>steered<pre id="left_steered"></pre>
unsteered<pre id="left_unsteered"></pre></div>
<div class="col"><h3 id="right_name">{{RIGHT}}</h3>steered<pre id="right_steered"></pre>
unsteered<pre id="right_unsteered"></pre></div></div>
<script>
const $=id=>document.getElementById(id);
$("left").value="{{LEFT}}"; $("right").value="{{RIGHT}}";
$("strength").oninput=()=>{$("strength_val").textContent=$("strength").value};
$("search").onclick=async()=>{
  const r=await fetch("/api/latents?q="+encodeURIComponent($("q").value)); const j=await r.json();
  $("latents").innerHTML="";
  for(const l of j.latents){const li=document.createElement("li");
    li.textContent=l.latent+": "+l.top_tokens.join(" | ");
    li.onclick=()=>{$("latent").value=l.latent; $("examples").textContent=(l.examples||[]).join("  ·  ")};
    $("latents").appendChild(li);}
};
$("generate").onclick=async()=>{
  $("status").textContent="generating..."; $("status").dataset.done="0";
  const body={prompt:$("prompt").value, latent:+$("latent").value, strength:+$("strength").value,
    precisions:[$("left").value,$("right").value], max_new_tokens:+$("ntok").value, mode:$("mode").value};
  const r=await fetch("/api/generate",{method:"POST",headers:{"Content-Type":"application/json"},body:JSON.stringify(body)});
  const j=await r.json();
  if(j.error){$("status").textContent="error: "+j.error; $("status").dataset.done="1"; return;}
  for(const side of ["left","right"]){const o=j.outputs[$(side).value];
    $(side+"_name").textContent=$(side).value; $(side+"_steered").textContent=o.steered;
    $(side+"_unsteered").textContent=o.unsteered;}
  $("status").textContent="done"; $("status").dataset.done="1";
};
</script></body></html>"""
