/* circuits graph viewer: hand-written SVG, no dependencies.
 *
 * Reads the graph (Neuronpedia/Anthropic legacy JSON, relp-spec §E) from
 * the JSON script element #circuits-graph and draws it into #cv-root:
 * layers on the y axis (embeddings at the bottom, logits at the top), token positions on x,
 * node size ~ |attribution|, colour = cluster (node.cluster or qParams.supernodes),
 * hover = labels, slider = |weight| edge filter, click = highlight neighbours.
 * window.circuitsViewer is a small API used by tests and the report page.
 */
(function () {
  "use strict";

  var SVGNS = "http://www.w3.org/2000/svg";
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                 "#17becf", "#bcbd22", "#d62728", "#393b79", "#637939", "#8c6d31",
                 "#843c39", "#7b4173", "#3182bd", "#e6550d"];
  var UNCLUSTERED = "#9ca3af";
  var POS_EDGE = "#2563eb";
  var NEG_EDGE = "#dc2626";
  var ROW_H = 26;
  var MIN_COL_W = 18;
  var MARGIN = { left: 64, right: 24, top: 24, bottom: 96 };
  var MAX_DRAWN_EDGES = 6000;
  var DEFAULT_EDGES = 400;

  function el(tag, attrs, parent) {
    var node = document.createElementNS(SVGNS, tag);
    if (attrs) { for (var k in attrs) { node.setAttribute(k, attrs[k]); } }
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function html(tag, attrs, text, parent) {
    var node = document.createElement(tag);
    if (attrs) { for (var k in attrs) { node.setAttribute(k, attrs[k]); } }
    if (text !== undefined && text !== null) { node.textContent = text; }
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined || typeof x !== "number" || !isFinite(x)) { return "–"; }
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) { return x.toExponential(2); }
    return x.toFixed(a < 1 ? 4 : 3);
  }

  function showToken(tok) {
    if (tok === undefined || tok === null) { return ""; }
    return String(tok).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/ /g, "\u2423");
  }

  function clusterColour(i) {
    if (i < PALETTE.length) { return PALETTE[i]; }
    return "hsl(" + Math.round((i * 137.508) % 360) + ",55%,48%)";
  }

  /* ------------------------------------------------------------------ model */
  function buildModel(data) {
    var meta = data.metadata || {};
    var tokens = meta.prompt_tokens || [];
    var nodes = [];
    var byId = {};
    var maxNeuronLayer = -1;
    (data.nodes || []).forEach(function (raw) {
      var type = raw.feature_type === "embedding" || raw.layer === "E" ? "embedding"
        : (raw.feature_type === "logit" || raw.isLogit === true ? "logit" : "neuron");
      var layer = type === "embedding" ? -1 : parseInt(raw.layer, 10);
      if (!isFinite(layer)) { layer = 0; }
      if (type === "neuron") { maxNeuronLayer = Math.max(maxNeuronLayer, layer); }
      var labels = Array.isArray(raw.labels) ? raw.labels : [];
      var node = {
        id: raw.node_id, type: type, layer: layer, pos: raw.ctx_idx, raw: raw,
        clerp: raw.clerp || "", label: raw.label || "", inputLabel: raw.input_label || "",
        unlabelled: type === "neuron" && !raw.label && labels.some(function (l) { return l && l.source === "unlabelled"; }),
        activation: raw.activation, influence: raw.influence, cluster: raw.cluster ? String(raw.cluster) : "",
        token: raw.token !== undefined ? raw.token : (raw.ctx_idx >= 0 ? tokens[raw.ctx_idx] : ""),
        prob: raw.token_prob, inEdges: [], outEdges: [], clusterKey: ""
      };
      nodes.push(node);
      byId[node.id] = node;
    });
    var logitLayer = maxNeuronLayer + 1;
    nodes.forEach(function (n) {
      if (n.type === "logit" && !(n.layer > maxNeuronLayer)) { n.layer = logitLayer; }
      if (n.type === "logit") { logitLayer = Math.max(logitLayer, n.layer); }
    });

    var edges = [];
    (data.links || []).forEach(function (raw, i) {
      var s = byId[raw.source], t = byId[raw.target];
      var w = typeof raw.weight === "number" ? raw.weight : 0;
      if (!s || !t || !isFinite(w)) { return; }
      var e = { i: i, source: s, target: t, weight: w, abs: Math.abs(w), el: null };
      edges.push(e);
      s.outEdges.push(e);
      t.inEdges.push(e);
    });
    edges.sort(function (a, b) { return b.abs - a.abs; });

    /* clusters: qParams.supernodes [label, id, id, ...] win, then node.cluster */
    var clusters = {};
    var order = [];
    function addTo(key, name, node) {
      if (!clusters[key]) { clusters[key] = { key: key, name: name, members: [] }; order.push(key); }
      if (!node.clusterKey) { node.clusterKey = key; clusters[key].members.push(node); }
    }
    var supernodes = (data.qParams && Array.isArray(data.qParams.supernodes)) ? data.qParams.supernodes : [];
    supernodes.forEach(function (sn) {
      if (!Array.isArray(sn) || sn.length < 2) { return; }
      var name = String(sn[0]);
      sn.slice(1).forEach(function (id) { if (byId[id]) { addTo("sn:" + name, name, byId[id]); } });
    });
    nodes.forEach(function (n) { if (!n.clusterKey && n.cluster) { addTo("c:" + n.cluster, "cluster " + n.cluster, n); } });
    var clusterList = order.map(function (k) { return clusters[k]; }).filter(function (c) { return c.members.length; });
    clusterList.sort(function (a, b) { return b.members.length - a.members.length || (a.name < b.name ? -1 : 1); });
    clusterList.forEach(function (c, i) { c.colour = clusterColour(i); c.index = i; });
    nodes.forEach(function (n) { n.colour = n.clusterKey ? clusters[n.clusterKey].colour : UNCLUSTERED; });

    var nPos = tokens.length;
    nodes.forEach(function (n) { if (n.pos >= nPos) { nPos = n.pos + 1; } });
    return { meta: meta, tokens: tokens, nodes: nodes, byId: byId, edges: edges, clusters: clusterList,
             clusterByKey: clusters, nPos: nPos, minLayer: -1, maxLayer: Math.max(logitLayer, 0) };
  }

  /* ----------------------------------------------------------------- layout */
  function layout(model, avail) {
    var maxAbs = { neuron: 0, embedding: 0, logit: 0 };
    model.nodes.forEach(function (n) {
      var v = n.type === "logit" ? Math.abs(n.prob || 0) : Math.abs(n.influence || 0);
      if (isFinite(v)) { maxAbs[n.type] = Math.max(maxAbs[n.type], v); }
    });
    model.nodes.forEach(function (n) {
      var v = n.type === "logit" ? Math.abs(n.prob || 0) : Math.abs(n.influence || 0);
      var f = maxAbs[n.type] > 0 && isFinite(v) ? Math.sqrt(v / maxAbs[n.type]) : 0;
      n.r = n.type === "neuron" ? 2.5 + 7.5 * f : (n.type === "embedding" ? 3 + 4 * f : 5 + 5 * f);
    });
    var cells = {};
    model.nodes.forEach(function (n) {
      var key = n.layer + "|" + n.pos;
      (cells[key] = cells[key] || []).push(n);
    });
    var colW = [];
    for (var p = 0; p < model.nPos; p++) { colW.push(MIN_COL_W); }
    Object.keys(cells).forEach(function (key) {
      var list = cells[key];
      list.sort(function (a, b) { return Math.abs(b.influence || 0) - Math.abs(a.influence || 0); });
      var width = 4;
      list.forEach(function (n) { width += 2 * n.r + 1.5; });
      var pos = list[0].pos;
      if (pos >= 0 && pos < colW.length) { colW[pos] = Math.max(colW[pos], width); }
    });
    // Spread the columns over the width the page offers (the plot should not hug the left edge).
    var used = MARGIN.left + MARGIN.right;
    colW.forEach(function (w) { used += w; });
    if (avail && used < avail) {
      var grow = Math.min(6, (avail - MARGIN.left - MARGIN.right) / (used - MARGIN.left - MARGIN.right));
      colW = colW.map(function (w) { return w * grow; });
    }
    var colX = [];
    var x = MARGIN.left;
    colW.forEach(function (w) { colX.push(x); x += w; });
    model.width = x + MARGIN.right;
    model.colX = colX;
    model.colW = colW;
    var nRows = model.maxLayer - model.minLayer + 1;
    model.height = MARGIN.top + nRows * ROW_H + MARGIN.bottom;
    model.rowY = function (layer) { return MARGIN.top + (model.maxLayer - layer) * ROW_H + ROW_H / 2; };
    Object.keys(cells).forEach(function (key) {
      var list = cells[key];
      var pos = list[0].pos;
      if (!(pos >= 0 && pos < colW.length)) { pos = 0; }
      var total = 0;
      list.forEach(function (n) { total += 2 * n.r + 1.5; });
      var cx = colX[pos] + colW[pos] / 2 - total / 2;
      list.forEach(function (n) {
        n.x = cx + n.r;
        n.y = model.rowY(n.layer);
        cx += 2 * n.r + 1.5;
      });
    });
  }

  /* ----------------------------------------------------------------- render */
  function Viewer(root, data) {
    this.root = root;
    this.model = buildModel(data);
    layout(this.model, Math.max(0, (root.clientWidth || 0) - 380));
    this.selected = null;
    this.focusCluster = null;
    var abs = this.model.edges.map(function (e) { return e.abs; }).filter(function (a) { return a > 0; });
    this.maxW = abs.length ? abs[0] : 1;
    this.minW = abs.length ? abs[abs.length - 1] : 1;
    if (this.minW <= 0 || this.minW === this.maxW) { this.minW = this.maxW / 1000; }
    var idx = Math.min(DEFAULT_EDGES, this.model.edges.length) - 1;
    this.threshold = idx >= 0 ? this.model.edges[idx].abs : 0;
    this.build();
  }

  Viewer.prototype.build = function () {
    var self = this, m = this.model;
    this.root.textContent = "";
    var header = html("div", { "class": "cv-header" }, null, this.root);
    html("div", { "class": "cv-title" }, m.meta.prompt !== undefined ? "“" + m.meta.prompt + "”" : "graph", header);
    var logits = m.nodes.filter(function (n) { return n.type === "logit"; });
    var sub = [m.meta.scan || m.meta.model || "", m.nodes.filter(function (n) { return n.type === "neuron"; }).length + " neurons",
      m.edges.length + " edges", m.clusters.length + " clusters"];
    if (logits.length) { sub.push("target: " + logits.map(function (n) { return n.clerp; }).join(", ")); }
    html("div", { "class": "cv-sub" }, sub.filter(Boolean).join(" · "), header);

    var controls = html("div", { "class": "cv-controls" }, null, this.root);
    html("label", { "for": "cv-threshold" }, "edge |weight| ≥ ", controls);
    this.slider = html("input", { id: "cv-threshold", type: "range", min: "0", max: "1000", step: "1" }, null, controls);
    this.sliderText = html("span", { "class": "cv-threshold-text", id: "cv-threshold-text" }, "", controls);
    var clear = html("button", { type: "button", id: "cv-clear" }, "clear selection", controls);
    clear.addEventListener("click", function () { self.clearSelection(); });
    this.slider.value = String(this.sliderFromThreshold(this.threshold));
    this.slider.addEventListener("input", function () {
      self.threshold = self.thresholdFromSlider(+self.slider.value);
      self.drawEdges();
      self.applyHighlight();
    });

    var body = html("div", { "class": "cv-body" }, null, this.root);
    var scroller = html("div", { "class": "cv-scroller" }, null, body);
    this.side = html("div", { "class": "cv-side" }, null, body);
    var svg = el("svg", { "class": "cv-svg", width: m.width, height: m.height,
                          viewBox: "0 0 " + m.width + " " + m.height }, scroller);
    this.svg = svg;
    el("rect", { x: 0, y: 0, width: m.width, height: m.height, fill: "transparent", "class": "cv-bg" }, svg)
      .addEventListener("click", function () { self.clearSelection(); });
    this.drawAxes();
    this.edgeLayer = el("g", { "class": "cv-edges" }, svg);
    this.nodeLayer = el("g", { "class": "cv-nodes" }, svg);
    this.drawNodes();
    this.drawEdges();
    this.tooltip = html("div", { "class": "cv-tooltip", id: "cv-tooltip" }, null, document.body);
    this.drawLegend();
    this.showDetails(null);
  };

  Viewer.prototype.sliderFromThreshold = function (t) {
    if (!(t > 0)) { return 0; }
    var lo = Math.log(this.minW), hi = Math.log(this.maxW);
    if (hi <= lo) { return 0; }
    return Math.max(0, Math.min(1000, Math.round(1000 * (Math.log(t) - lo) / (hi - lo))));
  };

  Viewer.prototype.thresholdFromSlider = function (s) {
    if (s <= 0) { return 0; }
    var lo = Math.log(this.minW), hi = Math.log(this.maxW);
    return Math.exp(lo + (hi - lo) * s / 1000);
  };

  Viewer.prototype.drawAxes = function () {
    var m = this.model, g = el("g", { "class": "cv-axes" }, this.svg);
    for (var layer = m.minLayer; layer <= m.maxLayer; layer++) {
      var y = m.rowY(layer);
      el("line", { x1: MARGIN.left - 4, x2: m.width - MARGIN.right, y1: y, y2: y, "class": "cv-gridline" }, g);
      var name = layer === -1 ? "Emb" : (layer === m.maxLayer && m.nodes.some(function (n) { return n.type === "logit"; }) ? "Logit" : "L" + layer);
      var t = el("text", { x: MARGIN.left - 8, y: y + 4, "text-anchor": "end", "class": "cv-axis-label" }, g);
      t.textContent = name;
    }
    var baseY = m.rowY(m.minLayer) + ROW_H / 2 + 6;
    for (var p = 0; p < m.nPos; p++) {
      var cx = m.colX[p] + m.colW[p] / 2;
      if (p % 2 === 1) {
        el("rect", { x: m.colX[p], y: MARGIN.top, width: m.colW[p], height: baseY - MARGIN.top - 6, "class": "cv-colband" }, g);
      }
      var label = el("text", { x: cx, y: baseY, "text-anchor": "end", "class": "cv-token",
                               transform: "rotate(-55 " + cx + " " + baseY + ")" }, g);
      label.textContent = showToken(m.tokens[p]) || String(p);
      var title = el("title", null, label);
      title.textContent = "position " + p;
    }
  };

  Viewer.prototype.drawNodes = function () {
    var self = this;
    this.model.nodes.forEach(function (n) {
      var g = el("g", { "class": "cv-node cv-" + n.type, "data-id": n.id, "data-cluster": n.clusterKey || "" }, self.nodeLayer);
      var shape;
      if (n.type === "embedding") {
        shape = el("rect", { x: n.x - n.r, y: n.y - n.r, width: 2 * n.r, height: 2 * n.r, rx: 1.5 }, g);
      } else if (n.type === "logit") {
        var r = n.r;
        shape = el("path", { d: "M" + n.x + " " + (n.y - r) + "L" + (n.x + r) + " " + n.y + "L" + n.x + " " + (n.y + r) + "L" + (n.x - r) + " " + n.y + "Z" }, g);
      } else {
        shape = el("circle", { cx: n.x, cy: n.y, r: n.r }, g);
      }
      shape.setAttribute("fill", n.colour);
      if (n.unlabelled) { g.classList.add("cv-unlabelled"); }
      n.el = g;
      g.addEventListener("mouseenter", function (ev) { self.showTooltip(n, ev); });
      g.addEventListener("mousemove", function (ev) { self.moveTooltip(ev); });
      g.addEventListener("mouseleave", function () { self.tooltip.style.display = "none"; });
      g.addEventListener("click", function (ev) { ev.stopPropagation(); self.select(n.id); });
    });
  };

  Viewer.prototype.visibleEdges = function () {
    var out = [], t = this.threshold;
    var edges = this.model.edges;
    for (var i = 0; i < edges.length && edges[i].abs >= t; i++) { out.push(edges[i]); }
    return out;
  };

  Viewer.prototype.drawEdges = function () {
    var edges = this.visibleEdges();
    var drawn = edges.slice(0, MAX_DRAWN_EDGES);
    this.model.edges.forEach(function (e) { e.el = null; });
    this.edgeLayer.textContent = "";
    var maxW = this.maxW;
    var frag = document.createDocumentFragment();
    for (var i = drawn.length - 1; i >= 0; i--) {  /* strongest drawn last = on top */
      var e = drawn[i], f = e.abs / maxW;
      var s = e.source, t = e.target;
      var midY = (s.y + t.y) / 2;
      var d = "M" + s.x.toFixed(1) + " " + s.y.toFixed(1) + "C" + s.x.toFixed(1) + " " + midY.toFixed(1) + " " +
              t.x.toFixed(1) + " " + midY.toFixed(1) + " " + t.x.toFixed(1) + " " + t.y.toFixed(1);
      var p = el("path", { d: d, "class": "cv-edge " + (e.weight >= 0 ? "cv-pos" : "cv-neg"),
                           stroke: e.weight >= 0 ? POS_EDGE : NEG_EDGE,
                           "stroke-width": (0.4 + 3.2 * f).toFixed(2),
                           "stroke-opacity": (0.12 + 0.65 * Math.sqrt(f)).toFixed(3) });
      e.el = p;
      frag.appendChild(p);
    }
    this.edgeLayer.appendChild(frag);
    this.drawnEdgeCount = drawn.length;
    var txt = "≥ " + fmt(this.threshold) + " — " + edges.length + " of " + this.model.edges.length + " edges";
    if (drawn.length < edges.length) { txt += " (drawing the strongest " + drawn.length + ")"; }
    this.sliderText.textContent = txt;
  };

  Viewer.prototype.neighbours = function (id) {
    var n = this.model.byId[id];
    if (!n) { return []; }
    var t = this.threshold, seen = {};
    n.inEdges.forEach(function (e) { if (e.abs >= t) { seen[e.source.id] = true; } });
    n.outEdges.forEach(function (e) { if (e.abs >= t) { seen[e.target.id] = true; } });
    delete seen[id];
    return Object.keys(seen).sort();
  };

  Viewer.prototype.select = function (id) {
    if (!this.model.byId[id]) { return false; }
    this.selected = id;
    this.focusCluster = null;
    this.applyHighlight();
    this.showDetails(this.model.byId[id]);
    return true;
  };

  Viewer.prototype.selectCluster = function (key) {
    this.selected = null;
    this.focusCluster = this.focusCluster === key ? null : key;
    this.applyHighlight();
    this.showDetails(null);
  };

  Viewer.prototype.clearSelection = function () {
    this.selected = null;
    this.focusCluster = null;
    this.applyHighlight();
    this.showDetails(null);
  };

  Viewer.prototype.applyHighlight = function () {
    var self = this, m = this.model;
    var active = this.selected !== null || this.focusCluster !== null;
    this.svg.classList.toggle("cv-focus", active);
    var keep = {};
    if (this.selected !== null) {
      keep[this.selected] = "selected";
      this.neighbours(this.selected).forEach(function (id) { keep[id] = "neighbour"; });
    } else if (this.focusCluster !== null) {
      m.nodes.forEach(function (n) { if (n.clusterKey === self.focusCluster) { keep[n.id] = "neighbour"; } });
    }
    m.nodes.forEach(function (n) {
      var state = keep[n.id];
      n.el.classList.toggle("cv-selected", state === "selected");
      n.el.classList.toggle("cv-neighbour", state === "neighbour");
      n.el.classList.toggle("cv-dim", active && !state);
    });
    m.edges.forEach(function (e) {
      if (!e.el) { return; }
      var on;
      if (self.selected !== null) { on = e.source.id === self.selected || e.target.id === self.selected; }
      else { on = !!(keep[e.source.id] && keep[e.target.id]); }
      e.el.classList.toggle("cv-hl", active && on);
      e.el.classList.toggle("cv-dim", active && !on);
    });
    var count = Object.keys(keep).length;
    this.root.setAttribute("data-highlighted", String(active ? count : 0));
  };

  Viewer.prototype.nodeTitle = function (n) {
    if (n.type === "neuron") { return "L" + n.layer + "/N" + n.raw.feature + " @ " + n.pos; }
    if (n.type === "embedding") { return "embedding @ " + n.pos; }
    return "logit " + (n.token || "");
  };

  Viewer.prototype.infoRows = function (n) {
    var rows = [];
    var cl = n.clusterKey ? this.model.clusterByKey[n.clusterKey].name : "";
    rows.push(["clerp", n.clerp]);
    if (n.type === "neuron") {
      rows.push(["label", n.label || (n.unlabelled ? "(unlabelled)" : "")]);
      if (n.inputLabel) { rows.push(["input", n.inputLabel]); }
    }
    rows.push(["token", showToken(n.token) + (n.pos >= 0 ? "  (pos " + n.pos + ")" : "")]);
    if (n.type !== "logit") { rows.push(["activation", fmt(n.activation)]); }
    rows.push(["attribution", fmt(n.influence)]);
    if (n.type === "logit") { rows.push(["probability", fmt(n.prob)]); }
    if (cl) { rows.push(["cluster", cl]); }
    rows.push(["edges", n.inEdges.length + " in · " + n.outEdges.length + " out"]);
    return rows;
  };

  Viewer.prototype.showTooltip = function (n, ev) {
    var tip = this.tooltip;
    tip.textContent = "";
    html("div", { "class": "cv-tip-title" }, this.nodeTitle(n), tip);
    var table = html("table", null, null, tip);
    this.infoRows(n).forEach(function (r) {
      if (!r[1]) { return; }
      var tr = html("tr", null, null, table);
      html("th", null, r[0], tr);
      html("td", null, r[1], tr);
    });
    tip.style.display = "block";
    this.moveTooltip(ev);
  };

  Viewer.prototype.moveTooltip = function (ev) {
    var tip = this.tooltip;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    var w = tip.offsetWidth, h = tip.offsetHeight;
    if (x + w > window.innerWidth - 8) { x = ev.clientX - w - 14; }
    if (y + h > window.innerHeight - 8) { y = ev.clientY - h - 14; }
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  };

  Viewer.prototype.drawLegend = function () {
    var self = this;
    this.legend = html("div", { "class": "cv-legend" }, null, this.root);
    html("div", { "class": "cv-legend-title" }, this.model.clusters.length ? "Clusters (click to focus)" : "No clusters in this graph", this.legend);
    var singles = 0;
    this.model.clusters.forEach(function (c) {
      if (c.members.length < 2 && ++singles > 8) { return; }
      var chip = html("button", { type: "button", "class": "cv-chip", "data-cluster": c.key }, null, self.legend);
      var sw = html("span", { "class": "cv-swatch" }, null, chip);
      sw.style.background = c.colour;
      html("span", null, c.name + " (" + c.members.length + ")", chip);
      chip.addEventListener("click", function () { self.selectCluster(c.key); });
    });
    if (singles > 8) {
      html("span", { "class": "cv-legend-more" }, "+ " + (singles - 8) + " more single-neuron clusters", this.legend);
    }
  };

  Viewer.prototype.showDetails = function (n) {
    var self = this, side = this.side;
    side.textContent = "";
    if (!n) {
      html("div", { "class": "cv-side-title" }, "Click a node", side);
      html("p", { "class": "cv-hint" }, "Hover a node for its labels; click it to highlight its neighbours " +
        "(edges above the slider threshold). Click the background to clear. Node size ~ |attribution|; " +
        "colour = cluster; blue edges excite, red inhibit.", side);
      return;
    }
    html("div", { "class": "cv-side-title" }, this.nodeTitle(n), side);
    var table = html("table", { "class": "cv-info" }, null, side);
    this.infoRows(n).forEach(function (r) {
      if (!r[1]) { return; }
      var tr = html("tr", null, null, table);
      html("th", null, r[0], tr);
      html("td", null, r[1], tr);
    });
    function list(title, edges, other) {
      var visible = edges.slice().sort(function (a, b) { return b.abs - a.abs; }).slice(0, 12);
      if (!visible.length) { return; }
      html("div", { "class": "cv-side-sub" }, title, side);
      var ul = html("ul", { "class": "cv-links" }, null, side);
      visible.forEach(function (e) {
        var o = other(e);
        var li = html("li", null, null, ul);
        var w = html("span", { "class": e.weight >= 0 ? "cv-w-pos" : "cv-w-neg" }, fmt(e.weight), li);
        w.title = "edge weight";
        var a = html("a", { href: "#" }, " " + o.clerp, li);
        a.addEventListener("click", function (ev) { ev.preventDefault(); self.select(o.id); });
      });
    }
    list("Strongest inputs", n.inEdges, function (e) { return e.source; });
    list("Strongest outputs", n.outEdges, function (e) { return e.target; });
  };

  /* ------------------------------------------------------------------- boot */
  function boot() {
    var root = document.getElementById("cv-root");
    var script = document.getElementById("circuits-graph");
    if (!root || !script) { return; }
    var data;
    try {
      data = JSON.parse(script.textContent);
    } catch (err) {
      root.textContent = "cannot parse the embedded graph: " + err.message;
      throw err;
    }
    var viewer = new Viewer(root, data);
    window.circuitsViewer = {
      viewer: viewer,
      nodeCount: function () { return viewer.model.nodes.length; },
      renderedNodeCount: function () { return viewer.nodeLayer.querySelectorAll("g.cv-node").length; },
      edgeCount: function () { return viewer.model.edges.length; },
      drawnEdgeCount: function () { return viewer.edgeLayer.querySelectorAll("path.cv-edge").length; },
      threshold: function () { return viewer.threshold; },
      setThreshold: function (t) { viewer.threshold = t; viewer.slider.value = String(viewer.sliderFromThreshold(t)); viewer.drawEdges(); viewer.applyHighlight(); },
      neighbours: function (id) { return viewer.neighbours(id); },
      select: function (id) { return viewer.select(id); },
      clearSelection: function () { viewer.clearSelection(); },
      clusterCount: function () { return viewer.model.clusters.length; }
    };
    document.documentElement.setAttribute("data-viewer-ready", "1");
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", boot);
  } else {
    boot();
  }
})();
