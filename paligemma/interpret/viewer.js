// The attention explorer of "PaliGemma from scratch": plain JavaScript, no library, no network.
// It reads an export of paligemma.interpret.export (a JSON script element beside its mount point) and draws
// the chosen map over the image on a canvas. Views: a generated token's attention to the image (one layer and
// head, or their mean), the same carried back through SigLIP's rollout, a prompt token's, one SigLIP patch's
// attention in one layer, and the rollout itself. Keys: left/right step through tokens (patches in the SigLIP
// views), up/down through layers. Every mount point is independent; the script may run more than once a page.
(function () {
  "use strict";
  if (window.PaliGemmaAttention) return;

  var VIEWS = [
    ["generated", "generated token \u2192 image"],
    ["through", "generated token \u2192 image, carried through SigLIP (rollout)"],
    ["prompt", "prompt token \u2192 image"],
    ["patch", "SigLIP: one patch's attention, per layer"],
    ["rollout", "SigLIP: attention rollout"]
  ];
  // Matplotlib's inferno colour map at nine points, interpolated between them.
  var INFERNO = [[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85], [227, 89, 51],
                 [249, 140, 10], [249, 201, 50], [252, 255, 164]];
  var CSS = [
    ".pga{font:14px/1.4 system-ui,sans-serif;border:1px solid #ccc;border-radius:6px;padding:10px;margin:8px 0;",
    "outline:none;max-width:100%;color:#222;background:#fff}",
    ".pga:focus-visible{box-shadow:0 0 0 2px #4a90d9}",
    ".pga-row{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;margin:4px 0}",
    ".pga select{font:inherit;max-width:100%}",
    ".pga-tokens{display:flex;flex-wrap:wrap;gap:4px;margin:6px 0}",
    ".pga-tokens button{font:13px ui-monospace,monospace;white-space:pre;border:1px solid #bbb;border-radius:4px;",
    "background:#f6f6f6;padding:2px 6px;cursor:pointer;color:#222}",
    ".pga-tokens button[aria-pressed=true]{background:#333;color:#fff;border-color:#333}",
    ".pga-body{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}",
    ".pga-main{cursor:crosshair;border:1px solid #999;image-rendering:auto}",
    ".pga-heads{display:grid;grid-template-columns:repeat(4,auto);gap:6px}",
    ".pga-heads figure{margin:0;text-align:center;font-size:12px;cursor:pointer}",
    ".pga-heads canvas{border:2px solid transparent}",
    ".pga-heads figure.pga-on canvas{border-color:#4a90d9}",
    ".pga-caption{margin:6px 0;min-height:2.8em}",
    ".pga-caption code{background:#eee;padding:0 3px;border-radius:3px;white-space:pre}",
    ".pga-help{color:#666;font-size:12px}"
  ].join("");

  function decodeBytes(text) {
    var binary = atob(text), bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  // A stored array: uint8 rows over the patches and one float32 maximum a row (see export.py).
  function Rows(packed) {
    this.shape = packed.shape;
    this.values = decodeBytes(packed.values);
    this.max = new Float32Array(decodeBytes(packed.max).buffer);
    this.width = this.shape[this.shape.length - 1];
  }
  // Row number `index` (a flat row index), dequantized.
  Rows.prototype.row = function (index) {
    var out = new Float32Array(this.width), scale = this.max[index] / 255, start = index * this.width;
    for (var i = 0; i < this.width; i++) out[i] = this.values[start + i] * scale;
    return out;
  };

  function mean(rows) {
    var out = new Float32Array(rows[0].length);
    rows.forEach(function (row) { for (var i = 0; i < row.length; i++) out[i] += row[i] / rows.length; });
    return out;
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function option(select, value, text) { select.appendChild(el("option", {value: String(value)}, text)); }

  function shown(text) { return JSON.stringify(text); }  // a text in quotes, its newlines as \n
  // A token as a label: a newline or a tab spelled out, so "\n" reads as the token it is.
  function visible(text) { return text.replace(/\n/g, "\\n").replace(/\t/g, "\\t"); }

  function Viewer(root, data) {
    this.root = root;
    this.examples = data.examples;
    this.state = {example: 0, view: "generated", layer: "last", head: "mean", item: 0, patch: null,
                  style: "spotlight"};
    this.build();
    this.load(0);
  }

  Viewer.prototype.build = function () {
    var self = this, root = this.root;
    root.classList.add("pga");
    root.setAttribute("tabindex", "0");
    root.setAttribute("role", "application");
    root.setAttribute("aria-label", "attention explorer: arrow keys step through tokens and layers");
    var controls = el("div", {"class": "pga-row"});
    this.example = el("select", {"aria-label": "example"});
    this.examples.forEach(function (example, i) { option(self.example, i, example.label); });
    this.view = el("select", {"aria-label": "view"});
    VIEWS.forEach(function (view) { option(self.view, view[0], view[1]); });
    this.layer = el("select", {"aria-label": "layer"});
    this.head = el("select", {"aria-label": "head"});
    this.style = el("select", {"aria-label": "style"});
    option(this.style, "spotlight", "spotlight");
    option(this.style, "heat", "heat");
    [["example", this.example], ["view", this.view], ["layer", this.layer], ["head", this.head],
     ["style", this.style]].forEach(function (pair) {
      var label = el("label", {}, pair[0] + " ");
      label.appendChild(pair[1]);
      controls.appendChild(label);
    });
    if (this.examples.length < 2) controls.firstChild.style.display = "none";
    this.text = el("div", {"class": "pga-row"});
    this.tokens = el("div", {"class": "pga-tokens", role: "toolbar", "aria-label": "tokens"});
    var body = el("div", {"class": "pga-body"});
    this.canvas = el("canvas", {"class": "pga-main", width: "336", height: "336"});
    this.heads = el("div", {"class": "pga-heads"});
    body.appendChild(this.canvas);
    body.appendChild(this.heads);
    this.caption = el("div", {"class": "pga-caption", "aria-live": "polite"});
    var help = el("div", {"class": "pga-help"},
                  "Click a token, or use \u2190 \u2192 to step through them and \u2191 \u2193 to change layer. " +
                  "In the SigLIP views, click a patch. Each map is scaled to its own maximum.");
    [controls, this.text, this.tokens, body, this.caption, help].forEach(function (node) { root.appendChild(node); });

    this.example.addEventListener("change", function () { self.load(Number(self.example.value)); });
    this.view.addEventListener("change", function () { self.state.view = self.view.value; self.options(); });
    this.layer.addEventListener("change", function () { self.state.layer = self.layer.value; self.draw(); });
    this.head.addEventListener("change", function () { self.state.head = self.head.value; self.draw(); });
    this.style.addEventListener("change", function () { self.state.style = self.style.value; self.draw(); });
    this.canvas.addEventListener("click", function (event) {
      var box = self.canvas.getBoundingClientRect(), grid = self.data.grid;
      var column = Math.min(grid - 1, Math.floor((event.clientX - box.left) / box.width * grid));
      var row = Math.min(grid - 1, Math.floor((event.clientY - box.top) / box.height * grid));
      var patch = row * grid + column;
      if (self.state.view === "patch") self.state.item = patch;
      else if (self.state.view === "rollout") self.state.patch = self.state.patch === patch ? null : patch;
      else return;
      self.draw();
    });
    root.addEventListener("keydown", function (event) {
      var step = {ArrowLeft: -1, ArrowRight: 1}[event.key], layer = {ArrowUp: -1, ArrowDown: 1}[event.key];
      if (event.target.tagName === "SELECT" || (step === undefined && layer === undefined)) return;
      event.preventDefault();
      if (step !== undefined) self.step(step);
      else self.stepLayer(layer);
    });
  };

  Viewer.prototype.load = function (index) {
    var example = this.examples[index];
    this.state.example = index;
    this.data = example;
    this.arrays = {generated: new Rows(example.decoder.generated), prompt: new Rows(example.decoder.prompt),
                   rollout: new Rows(example.vision.rollout),
                   patch: example.vision.patch ? new Rows(example.vision.patch) : null};
    this.view.querySelector("option[value=patch]").disabled = !this.arrays.patch;
    if (this.state.view === "patch" && !this.arrays.patch) this.state.view = "generated";
    this.image = new Image();
    var self = this;
    this.image.onload = function () { self.draw(); };
    this.image.src = example.image;
    this.text.textContent = "";
    this.text.appendChild(el("span", {}, "prompt: " + shown(example.prompt)));
    this.text.appendChild(el("span", {}, "answer: " + shown(example.answer)));
    this.state.item = 0;
    this.state.patch = null;
    this.options();
  };

  Viewer.prototype.isVision = function () { return this.state.view === "patch" || this.state.view === "rollout"; };

  // Layer and head choices and the token buttons follow the view: the decoder's sizes or SigLIP's.
  Viewer.prototype.options = function () {
    var self = this, data = this.data, state = this.state, vision = this.isVision();
    this.view.value = state.view;
    var layers = vision ? data.vision.layers : data.decoder.layers;
    var heads = data.decoder.heads;
    this.layer.textContent = "";
    option(this.layer, "last", "last (" + (layers - 1) + ")");
    option(this.layer, "mean", "mean over layers");
    for (var l = 0; l < layers; l++) option(this.layer, l, String(l));
    if (!(state.layer === "last" || state.layer === "mean" || Number(state.layer) < layers)) state.layer = "last";
    if (state.view === "rollout") state.layer = "last";
    this.layer.value = state.layer;
    this.layer.disabled = state.view === "rollout";
    this.head.textContent = "";
    option(this.head, "mean", "mean over heads");
    if (!vision) for (var h = 0; h < heads; h++) option(this.head, h, String(h));
    if (vision || !(state.head === "mean" || Number(state.head) < heads)) state.head = "mean";
    this.head.value = state.head;
    this.head.disabled = vision;
    this.tokens.textContent = "";
    this.buttons = [];
    if (!vision) {
      var list = state.view === "prompt" ? data.prompt_tokens : data.tokens;
      list.forEach(function (token, i) {
        var button = el("button", {type: "button", "aria-pressed": "false"}, visible(token.text));
        button.addEventListener("click", function () { state.item = i; self.draw(); self.root.focus(); });
        self.tokens.appendChild(button);
        self.buttons.push(button);
      });
      state.item = Math.min(state.item, list.length - 1);
    } else if (state.view === "patch") {
      state.item = Math.min(state.item, data.grid * data.grid - 1);
    }
    this.draw();
  };

  Viewer.prototype.items = function () {
    var data = this.data;
    if (this.state.view === "prompt") return data.prompt_tokens.length;
    if (this.state.view === "patch") return data.grid * data.grid;
    if (this.state.view === "rollout") return data.grid * data.grid;
    return data.tokens.length;
  };

  Viewer.prototype.step = function (delta) {
    var count = this.items(), state = this.state;
    if (state.view === "rollout") {
      state.patch = state.patch === null ? (delta > 0 ? 0 : count - 1) : (state.patch + delta + count) % count;
    } else {
      state.item = (state.item + delta + count) % count;
    }
    this.draw();
  };

  Viewer.prototype.stepLayer = function (delta) {
    if (this.state.view === "rollout") return;
    var layers = this.isVision() ? this.data.vision.layers : this.data.decoder.layers;
    var current = this.state.layer === "last" ? layers - 1 : this.state.layer === "mean" ? -1 : Number(this.state.layer);
    var next = Math.max(0, Math.min(layers - 1, current + delta));
    this.state.layer = String(next);
    this.layer.value = this.state.layer;
    this.draw();
  };

  // The decoder's map of item `item` (a generated or prompt token) for one layer and one head (a number) or the
  // mean over heads; `layer` may be "mean" too.
  Viewer.prototype.decoderMap = function (item, layer, head) {
    var data = this.data, rows = this.arrays[this.state.view === "prompt" ? "prompt" : "generated"];
    var layers = data.decoder.layers, heads = data.decoder.heads;
    var layerList = layer === "mean" ? range(layers) : [layer === "last" ? layers - 1 : Number(layer)];
    var headList = head === "mean" ? range(heads) : [Number(head)];
    var perLayer = layerList.map(function (l) {
      return mean(headList.map(function (h) { return rows.row((item * layers + l) * heads + h); }));
    });
    var map = mean(perLayer);
    return this.state.view === "through" ? this.throughVision(map) : map;
  };

  // A map over SigLIP's output patches carried back to its input patches: map @ rollout.
  Viewer.prototype.throughVision = function (map) {
    var rollout = this.arrays.rollout, out = new Float32Array(map.length);
    for (var i = 0; i < map.length; i++) {
      if (!map[i]) continue;
      var row = rollout.row(i);
      for (var j = 0; j < row.length; j++) out[j] += map[i] * row[j];
    }
    return out;
  };

  Viewer.prototype.visionMap = function () {
    var state = this.state, patches = this.data.grid * this.data.grid;
    if (state.view === "rollout") {
      if (state.patch !== null) return this.arrays.rollout.row(state.patch);
      var all = [];
      for (var i = 0; i < patches; i++) all.push(this.arrays.rollout.row(i));
      return mean(all);
    }
    var layers = this.data.vision.layers, self = this;
    var list = state.layer === "mean" ? range(layers) : [state.layer === "last" ? layers - 1 : Number(state.layer)];
    return mean(list.map(function (l) { return self.arrays.patch.row(l * patches + state.item); }));
  };

  function range(n) { var out = []; for (var i = 0; i < n; i++) out.push(i); return out; }

  function colour(level) {
    var x = Math.max(0, Math.min(1, level)) * (INFERNO.length - 1), i = Math.min(INFERNO.length - 2, Math.floor(x));
    var f = x - i, a = INFERNO[i], b = INFERNO[i + 1];
    return [0, 1, 2].map(function (k) { return Math.round(a[k] + (b[k] - a[k]) * f); });
  }

  // One map over the image on `canvas`: each patch covers exactly its pixels, scaled to the map's maximum.
  Viewer.prototype.paint = function (canvas, map, mark) {
    var context = canvas.getContext("2d"), size = canvas.width, grid = this.data.grid;
    context.imageSmoothingEnabled = true;
    context.clearRect(0, 0, size, size);
    if (this.image.complete && this.image.naturalWidth) context.drawImage(this.image, 0, 0, size, size);
    var top = 0;
    for (var i = 0; i < map.length; i++) top = Math.max(top, map[i]);
    for (var p = 0; p < map.length; p++) {
      var level = top > 0 ? map[p] / top : 0, row = Math.floor(p / grid), column = p % grid;
      var x0 = Math.round(column * size / grid), y0 = Math.round(row * size / grid);
      var x1 = Math.round((column + 1) * size / grid), y1 = Math.round((row + 1) * size / grid);
      if (this.state.style === "heat") {
        var c = colour(level);
        context.fillStyle = "rgba(" + c[0] + "," + c[1] + "," + c[2] + "," + (0.8 * level).toFixed(3) + ")";
      } else {
        context.fillStyle = "rgba(0,0,0," + (0.88 * (1 - level)).toFixed(3) + ")";
      }
      context.fillRect(x0, y0, x1 - x0, y1 - y0);
    }
    if (mark !== null && mark !== undefined) {
      var r = Math.floor(mark / grid), k = mark % grid;
      context.strokeStyle = "cyan";
      context.lineWidth = Math.max(1.5, size / 160);
      context.strokeRect(k * size / grid, r * size / grid, size / grid, size / grid);
    }
  };

  Viewer.prototype.draw = function () {
    var self = this, state = this.state, data = this.data;
    (this.buttons || []).forEach(function (button, i) {
      button.setAttribute("aria-pressed", String(i === state.item));
    });
    this.heads.textContent = "";
    var mark = state.view === "patch" ? state.item : state.view === "rollout" ? state.patch : null;
    var map;
    if (this.isVision()) {
      map = this.visionMap();
    } else {
      map = this.decoderMap(state.item, state.layer, state.head);
      var layerName = state.layer === "mean" ? "mean of layers" :
        "layer " + (state.layer === "last" ? data.decoder.layers - 1 : state.layer);
      range(data.decoder.heads).forEach(function (h) {
        var figure = el("figure", {"class": String(h) === String(state.head) ? "pga-on" : ""});
        var small = el("canvas", {width: "96", height: "96"});
        figure.appendChild(small);
        figure.appendChild(el("figcaption", {}, layerName + ", head " + h));
        figure.addEventListener("click", function () {
          state.head = String(h);
          self.head.value = state.head;
          self.draw();
        });
        self.heads.appendChild(figure);
        self.paint(small, self.decoderMap(state.item, state.layer, h));
      });
    }
    this.paint(this.canvas, map, mark);
    this.canvas.setAttribute("data-map", Array.prototype.map.call(map, function (v) { return v.toFixed(4); }).join(" "));
    this.caption.textContent = "";
    this.caption.appendChild(this.describe(map));
  };

  Viewer.prototype.describe = function (map) {
    var state = this.state, data = this.data, line = el("span");
    var total = 0;
    for (var i = 0; i < map.length; i++) total += map[i];
    var layer = state.layer === "mean" ? "mean over layers" : "layer " + (state.layer === "last" ?
      (this.isVision() ? data.vision.layers : data.decoder.layers) - 1 : state.layer);
    var head = state.head === "mean" ? "mean over heads" : "head " + state.head;
    function capital(text) { return text.charAt(0).toUpperCase() + text.slice(1); }
    function code(text) { return el("code", {}, visible(text)); }
    function add() { Array.prototype.forEach.call(arguments, function (part) {
      line.appendChild(typeof part === "string" ? document.createTextNode(part) : part); }); }
    if (state.view === "generated" || state.view === "through") {
      var token = data.tokens[state.item];
      add("Token " + (state.item + 1) + " of " + data.tokens.length + ": ", code(token.text), " (id " + token.id +
          "), predicted at position " + token.predicted_at + " by the query of ", code(token.predictor), ". ",
          capital(layer) + ", " + head + ": " + (100 * total).toFixed(1) + "% of that attention is on the image",
          state.view === "through" ? ", carried back to the input patches through SigLIP's rollout." : ".");
    } else if (state.view === "prompt") {
      var word = data.prompt_tokens[state.item];
      add("Prompt token ", code(word.text), " at position " + word.position + ". " + capital(layer) + ", " + head + ": " +
          (100 * total).toFixed(1) + "% of its attention is on the image.");
    } else if (state.view === "patch") {
      add("SigLIP, " + layer + ", mean over heads: where patch (" + Math.floor(state.item / data.grid) + ", " +
          state.item % data.grid + ") looks. Click another patch, or step with \u2190 \u2192.");
    } else {
      add(state.patch === null ? "Rollout through all of SigLIP, the mean over output patches: what the image " +
          "tokens handed to Gemma are made of. Click a patch to see its own row."
          : "Rollout: what output patch (" + Math.floor(state.patch / data.grid) + ", " + state.patch % data.grid +
            ") draws from, through every layer. Click it again for the mean.");
    }
    return line;
  };

  function mount(id) {
    var root = document.getElementById(id), source = document.getElementById(id + "-data");
    if (!root || !source || root.getAttribute("data-mounted")) return;
    root.setAttribute("data-mounted", "true");
    if (!document.getElementById("pga-style")) {
      var style = el("style", {id: "pga-style"});
      style.textContent = CSS;
      document.head.appendChild(style);
    }
    root.textContent = "";
    root.viewer = new Viewer(root, JSON.parse(source.textContent));
  }

  window.PaliGemmaAttention = {mount: mount};
})();
