/* circuits graph viewer: hand-written SVG, no dependencies, no network requests.
 *
 * Reads the graph (the viewers' legacy JSON, relp-spec §E) from the JSON script element
 * #circuits-graph and draws it into #cv-root, fitted to the window: layers on y (embeddings at
 * the bottom, logits on top, labelled with their tokens), token positions on x with the token
 * axis below, node size ~ |attribution| (signed RelP score), colour = cluster (node.cluster or
 * qParams.supernodes) or, without clusters, the sign of the attribution. Labels (clerps) are
 * written beside the strongest nodes. Two filters: nodes by cumulative influence share (the
 * `influence` field, kept when <= the threshold, as circuit-tracer and Neuronpedia prune) and
 * edges by |weight|. Wheel = zoom, drag = pan, double-click / "fit" = whole graph again.
 * Hover = details, click = highlight neighbours. An optional #circuits-graphs list adds a picker.
 * window.circuitsViewer is a small API used by tests and the report page.
 */
(function () {
  "use strict";

  var SVGNS = "http://www.w3.org/2000/svg";
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                 "#17becf", "#bcbd22", "#d62728", "#393b79", "#637939", "#8c6d31",
                 "#843c39", "#7b4173", "#3182bd", "#e6550d"];
  var UNCLUSTERED = "#9ca3af";
  var POS_NODE = "#60a5fa";
  var NEG_NODE = "#f87171";
  var POS_EDGE = "#2563eb";
  var NEG_EDGE = "#dc2626";
  var MARGIN = { left: 46, right: 16, top: 54, bottom: 92 };
  var MAX_DRAWN_EDGES = 6000;
  var DEFAULT_EDGES = 400;
  var DEFAULT_NODE_THRESHOLD = 0.8;
  var LABELLED_NODES = 14;
  var LABEL_CHARS = 30;

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

  function isNum(x) { return typeof x === "number" && isFinite(x); }

  /* whitespace made visible the way circuit-tracer shows tokens */
  function showToken(tok) {
    if (tok === undefined || tok === null) { return ""; }
    return String(tok).replace(/\n/g, "\u23ce").replace(/\t/g, "\u2192").replace(/\r/g, "\u21b5");
  }

  function clip(text, n) {
    text = String(text);
    return text.length > n ? text.slice(0, n - 1) + "\u2026" : text;
  }

  function clusterColour(i) {
    if (i < PALETTE.length) { return PALETTE[i]; }
    return "hsl(" + Math.round((i * 137.508) % 360) + ",55%,48%)";
  }

  /* token of a logit: between the double quotes of `Output " Paris" (p=0.773)` (the viewers'
     rule), else our older `" Paris (p=0.7725)"` form, else the node's token field */
  function logitToken(raw) {
    var c = raw.clerp || "";
    var m = /^Output "([\s\S]*)" \(p=[^)]*\)$/.exec(c) || /^([\s\S]*) \(p=[^)]*\)$/.exec(c);
    return m ? m[1] : (raw.token !== undefined ? String(raw.token) : c);
  }

  /* ------------------------------------------------------------------ model */
  function buildModel(data) {
    var meta = data.metadata || {};
    var tokens = meta.prompt_tokens || [];
    var nodes = [];
    var byId = {};
    var maxNeuronLayer = -1, minNeuronLayer = Infinity;
    /* files written for the viewers keep the signed score in `attribution`; older ones in `influence` */
    var signedKey = (data.nodes || []).some(function (n) { return n && "attribution" in n; }) ? "attribution" : "influence";
    var hasShares = signedKey === "attribution";
    (data.nodes || []).forEach(function (raw) {
      var type = raw.feature_type === "embedding" || raw.layer === "E" ? "embedding"
        : (raw.feature_type === "logit" || raw.isLogit === true ? "logit" : "neuron");
      var layer = type === "embedding" ? -1 : parseInt(raw.layer, 10);
      if (!isFinite(layer)) { layer = 0; }
      if (type === "neuron") { maxNeuronLayer = Math.max(maxNeuronLayer, layer); minNeuronLayer = Math.min(minNeuronLayer, layer); }
      var labels = Array.isArray(raw.labels) ? raw.labels : [];
      var pos = typeof raw.ctx_idx === "number" && raw.ctx_idx >= 0 ? raw.ctx_idx : 0;
      var node = {
        id: raw.node_id, type: type, layer: layer, pos: pos, raw: raw,
        clerp: raw.clerp || "", label: raw.label || "", inputLabel: raw.input_label || "",
        unlabelled: type === "neuron" && !raw.label && labels.some(function (l) { return l && l.source === "unlabelled"; }),
        activation: raw.activation, attribution: raw[signedKey],
        share: hasShares && isNum(raw.influence) ? raw.influence : null,
        cluster: raw.cluster ? String(raw.cluster) : "",
        token: type === "logit" ? logitToken(raw) : (raw.token !== undefined ? raw.token : tokens[pos]),
        prob: raw.token_prob, inEdges: [], outEdges: [], clusterKey: "", visible: true
      };
      node.absAttr = isNum(node.attribution) ? Math.abs(node.attribution) : 0;
      nodes.push(node);
      byId[node.id] = node;
    });
    if (!isFinite(minNeuronLayer)) { minNeuronLayer = 0; }
    var logitLayer = maxNeuronLayer + 1;
    nodes.forEach(function (n) { if (n.type === "logit") { n.layer = logitLayer; } });

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
    nodes.forEach(function (n) {
      if (clusterList.length) { n.colour = n.clusterKey ? clusters[n.clusterKey].colour : UNCLUSTERED; }
      else { n.colour = isNum(n.attribution) && n.attribution < 0 ? NEG_NODE : POS_NODE; }
    });

    var nPos = tokens.length;
    nodes.forEach(function (n) { if (n.pos >= nPos) { nPos = n.pos + 1; } });
    var threshold = isNum(meta.node_threshold) && meta.node_threshold > 0 && meta.node_threshold <= 1
      ? meta.node_threshold : DEFAULT_NODE_THRESHOLD;
    return { meta: meta, tokens: tokens, nodes: nodes, byId: byId, edges: edges, clusters: clusterList,
             clusterByKey: clusters, nPos: Math.max(nPos, 1), hasShares: hasShares,
             defaultNodeThreshold: hasShares ? threshold : 1,
             minNeuronLayer: minNeuronLayer, maxNeuronLayer: Math.max(maxNeuronLayer, minNeuronLayer),
             logitLayer: logitLayer };
  }

  /* ----------------------------------------------------------------- layout */
  /* Places the visible nodes inside width x height: one row per layer from the lowest to the
     highest neuron layer (plus embeddings below and logits above), one column per token
     position, wider where cells hold more nodes. */
  function layout(model, width, height) {
    var rows = [-1];
    for (var l = model.minNeuronLayer; l <= model.maxNeuronLayer; l++) { rows.push(l); }
    rows.push(model.logitLayer);
    var rowOf = {};
    rows.forEach(function (layer, i) { rowOf[layer] = i; });
    var plotH = Math.max(60, height - MARGIN.top - MARGIN.bottom);
    var rowH = plotH / rows.length;
    model.rows = rows;
    model.rowH = rowH;
    model.rowY = function (layer) {
      var i = rowOf[layer];
      if (i === undefined) { i = layer < 0 ? 0 : rows.length - 1; }
      return MARGIN.top + (rows.length - 1 - i) * rowH + rowH / 2;
    };
    var rMax = Math.max(2.5, Math.min(9, rowH * 0.42));
    var visible = model.nodes.filter(function (n) { return n.visible; });
    var maxAbs = { neuron: 0, embedding: 0, logit: 0 };
    visible.forEach(function (n) {
      var v = n.type === "logit" ? Math.abs(n.prob || 0) : n.absAttr;
      if (isFinite(v)) { maxAbs[n.type] = Math.max(maxAbs[n.type], v); }
    });
    visible.forEach(function (n) {
      var v = n.type === "logit" ? Math.abs(n.prob || 0) : n.absAttr;
      var f = maxAbs[n.type] > 0 && isFinite(v) ? Math.sqrt(v / maxAbs[n.type]) : 0;
      n.r = n.type === "neuron" ? rMax * (0.38 + 0.62 * f) : (n.type === "embedding" ? Math.min(rMax, 5) : Math.min(rMax + 1, 7));
    });

    var cells = {};
    var crowd = [];
    for (var p = 0; p < model.nPos; p++) { crowd.push(0); }
    visible.forEach(function (n) {
      if (n.type === "logit") { return; }
      var key = n.layer + "|" + n.pos;
      (cells[key] = cells[key] || []).push(n);
    });
    Object.keys(cells).forEach(function (key) {
      var list = cells[key];
      list.sort(function (a, b) { return b.absAttr - a.absAttr || (a.id < b.id ? -1 : 1); });
      var need = 0;
      list.forEach(function (n) { need += 2 * n.r + 2; });
      crowd[list[0].pos] = Math.max(crowd[list[0].pos], need);
    });
    /* every column gets a base share; crowded columns get more, up to what their cells need */
    var plotW = Math.max(60, width - MARGIN.left - MARGIN.right);
    var base = Math.min(plotW / model.nPos, 16);
    var extra = crowd.map(function (c) { return Math.max(0, c - base); });
    var extraSum = extra.reduce(function (a, b) { return a + b; }, 0);
    var spare = plotW - base * model.nPos;
    var colW = crowd.map(function (c, i) {
      if (extraSum <= 0) { return plotW / model.nPos; }
      return base + extra[i] * Math.min(1, spare / extraSum);
    });
    var used = colW.reduce(function (a, b) { return a + b; }, 0);
    if (used < plotW) {
      var grow = plotW / used;
      colW = colW.map(function (w) { return w * grow; });
    }
    var colX = [];
    var x = MARGIN.left;
    colW.forEach(function (w) { colX.push(x); x += w; });
    model.colX = colX;
    model.colW = colW;
    model.width = width;
    model.height = height;
    Object.keys(cells).forEach(function (key) {
      var list = cells[key];
      var pos = list[0].pos;
      var need = 0;
      list.forEach(function (n) { need += 2 * n.r + 2; });
      var squeeze = Math.min(1, (colW[pos] - 2) / need);
      var cx = colX[pos] + colW[pos] / 2 - need * squeeze / 2;
      list.forEach(function (n) {
        n.x = cx + (n.r + 1) * squeeze;
        n.y = model.rowY(n.layer);
        cx += (2 * n.r + 2) * squeeze;
      });
    });
    /* logits: a row of diamonds on top, most probable nearest their column, labelled above */
    var logits = visible.filter(function (n) { return n.type === "logit"; });
    logits.sort(function (a, b) { return (b.prob || 0) - (a.prob || 0) || (a.id < b.id ? -1 : 1); });
    var slot = Math.max(34, Math.min(90, plotW / Math.max(1, logits.length)));
    var byPos = {};
    logits.forEach(function (n) { (byPos[n.pos] = byPos[n.pos] || []).push(n); });
    Object.keys(byPos).forEach(function (pos) {
      var list = byPos[pos];
      var centre = colX[pos] + colW[pos] / 2;
      var span = slot * (list.length - 1);
      var start = Math.min(centre, MARGIN.left + plotW - slot / 2) - span;   /* grow leftwards */
      start = Math.max(MARGIN.left + slot / 2, start);
      list.forEach(function (n, i) { n.x = start + i * slot; n.y = model.rowY(n.layer); });
    });
    model.logitSlot = slot;
  }

  /* ----------------------------------------------------------------- render */
  function Viewer(root, data, graphs) {
    this.root = root;
    this.data = data;
    this.graphs = graphs || [];
    this.model = buildModel(data);
    this.selected = null;
    this.focusCluster = null;
    this.nodeThreshold = this.model.defaultNodeThreshold;
    this.showLabels = true;
    this.zoom = { k: 1, x: 0, y: 0 };
    this.applyNodeFilter();
    var visibleEdges = this.candidateEdges();
    var abs = this.model.edges.map(function (e) { return e.abs; }).filter(function (a) { return a > 0; });
    this.maxW = abs.length ? abs[0] : 1;
    this.minW = abs.length ? abs[abs.length - 1] : 1;
    if (this.minW <= 0 || this.minW === this.maxW) { this.minW = this.maxW / 1000; }
    var idx = Math.min(DEFAULT_EDGES, visibleEdges.length) - 1;
    this.threshold = idx >= 0 ? visibleEdges[idx].abs : 0;
    this.build();
  }

  Viewer.prototype.applyNodeFilter = function () {
    var t = this.nodeThreshold, pinned = this.pinned || {};
    this.model.nodes.forEach(function (n) {
      n.visible = n.type !== "neuron" || n.share === null || n.share <= t + 1e-12 || pinned[n.id] === true;
    });
  };

  Viewer.prototype.candidateEdges = function () {
    return this.model.edges.filter(function (e) { return e.source.visible && e.target.visible; });
  };

  Viewer.prototype.build = function () {
    var self = this, m = this.model;
    this.root.textContent = "";
    this.root.classList.add("cv-app");
    var header = html("div", { "class": "cv-header" }, null, this.root);
    var titleRow = html("div", { "class": "cv-title-row" }, null, header);
    html("div", { "class": "cv-title" }, m.meta.prompt !== undefined ? "\u201c" + m.meta.prompt + "\u201d" : "graph", titleRow);
    if (this.graphs.length > 1) { this.buildPicker(titleRow); }
    var logits = m.nodes.filter(function (n) { return n.type === "logit"; });
    var sub = [m.meta.model || m.meta.scan || "", m.nodes.filter(function (n) { return n.type === "neuron"; }).length + " neurons",
      m.edges.length + " edges", m.clusters.length ? m.clusters.length + " clusters" : ""];
    if (logits.length) {
      sub.push("targets: " + logits.map(function (n) { return "\"" + n.token + "\"" + (isNum(n.prob) ? " " + (100 * n.prob).toFixed(1) + "%" : ""); }).join(", "));
    }
    html("div", { "class": "cv-sub" }, sub.filter(Boolean).join(" \u00b7 "), header);

    var controls = html("div", { "class": "cv-controls" }, null, this.root);
    var nodeBox = html("span", { "class": "cv-control" }, null, controls);
    html("label", { "for": "cv-node-threshold" }, "nodes: cumulative influence \u2264 ", nodeBox);
    this.nodeSlider = html("input", { id: "cv-node-threshold", type: "range", min: "0.01", max: "1", step: "0.01" }, null, nodeBox);
    this.nodeSlider.value = String(this.nodeThreshold);
    if (!m.hasShares) { this.nodeSlider.disabled = true; nodeBox.title = "this file has no influence shares (older format)"; }
    this.nodeText = html("span", { "class": "cv-threshold-text", id: "cv-node-threshold-text" }, "", nodeBox);
    this.nodeSlider.addEventListener("input", function () { self.setNodeThreshold(+self.nodeSlider.value); });

    var edgeBox = html("span", { "class": "cv-control" }, null, controls);
    html("label", { "for": "cv-threshold" }, "edges: |weight| \u2265 ", edgeBox);
    this.slider = html("input", { id: "cv-threshold", type: "range", min: "0", max: "1000", step: "1" }, null, edgeBox);
    this.sliderText = html("span", { "class": "cv-threshold-text", id: "cv-threshold-text" }, "", edgeBox);
    this.slider.value = String(this.sliderFromThreshold(this.threshold));
    this.slider.addEventListener("input", function () {
      self.threshold = self.thresholdFromSlider(+self.slider.value);
      self.drawEdges();
      self.applyHighlight();
    });
    var labelBox = html("label", { "class": "cv-control" }, null, controls);
    this.labelToggle = html("input", { type: "checkbox", id: "cv-labels" }, null, labelBox);
    this.labelToggle.checked = true;
    labelBox.appendChild(document.createTextNode(" labels"));
    this.labelToggle.addEventListener("change", function () { self.showLabels = self.labelToggle.checked; self.drawLabels(); });
    var fit = html("button", { type: "button", id: "cv-fit" }, "fit", controls);
    fit.addEventListener("click", function () { self.fit(); });
    var clear = html("button", { type: "button", id: "cv-clear" }, "clear selection", controls);
    clear.addEventListener("click", function () { self.clearSelection(); });
    html("span", { "class": "cv-hint-inline" }, "wheel: zoom \u00b7 drag: pan \u00b7 double-click: fit", controls);

    var body = html("div", { "class": "cv-body" }, null, this.root);
    this.pane = html("div", { "class": "cv-scroller cv-pane" }, null, body);
    var sideWrap = html("div", { "class": "cv-side-wrap" }, null, body);
    this.side = html("div", { "class": "cv-side" }, null, sideWrap);
    this.legend = html("div", { "class": "cv-legend" }, null, sideWrap);
    this.svg = el("svg", { "class": "cv-svg" }, this.pane);
    this.tooltip = html("div", { "class": "cv-tooltip", id: "cv-tooltip" }, null, document.body);
    this.installZoom();
    this.render();
    this.drawLegend();
    this.showDetails(null);
    var pending = null;
    window.addEventListener("resize", function () {
      if (pending) { clearTimeout(pending); }
      pending = setTimeout(function () { pending = null; self.render(); }, 120);
    });
  };

  Viewer.prototype.buildPicker = function (parent) {
    var box = html("label", { "class": "cv-picker" }, "graph ", parent);
    var select = html("select", { id: "cv-picker" }, null, box);
    var here = (this.data.metadata || {}).slug;
    this.graphs.forEach(function (g) {
      var opt = html("option", { value: g.href }, clip((g.scan ? g.scan + " \u2014 " : "") + (g.prompt || g.slug || g.href), 90), select);
      if (g.slug === here) { opt.selected = true; }
    });
    select.addEventListener("change", function () { window.location.href = select.value; });
  };

  /* (re)draw everything for the pane's current size and the node filter */
  Viewer.prototype.render = function () {
    var m = this.model;
    var w = Math.max(320, this.pane.clientWidth || 0), h = Math.max(240, this.pane.clientHeight || 0);
    layout(m, w, h);
    var svg = this.svg;
    svg.setAttribute("width", w);
    svg.setAttribute("height", h);
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.textContent = "";
    var self = this;
    this.bg = el("rect", { x: 0, y: 0, width: w, height: h, fill: "transparent", "class": "cv-bg" }, svg);
    this.bg.addEventListener("click", function () { if (!self.dragged) { self.clearSelection(); } });
    this.viewport = el("g", { "class": "cv-viewport" }, svg);
    this.drawAxes();
    this.edgeLayer = el("g", { "class": "cv-edges" }, this.viewport);
    this.nodeLayer = el("g", { "class": "cv-nodes" }, this.viewport);
    this.labelLayer = el("g", { "class": "cv-labels" }, this.viewport);
    this.drawNodes();
    this.drawEdges();
    this.drawLabels();
    this.applyZoom();
    this.applyHighlight();
    this.updateNodeText();
  };

  Viewer.prototype.updateNodeText = function () {
    var neurons = this.model.nodes.filter(function (n) { return n.type === "neuron"; });
    var shown = neurons.filter(function (n) { return n.visible; }).length;
    this.nodeText.textContent = this.nodeThreshold.toFixed(2) + " \u2014 " + shown + " of " + neurons.length + " neurons";
  };

  Viewer.prototype.setNodeThreshold = function (t) {
    this.nodeThreshold = Math.max(0, Math.min(1, t));
    this.nodeSlider.value = String(this.nodeThreshold);
    this.applyNodeFilter();
    if (this.selected !== null && !this.model.byId[this.selected].visible) { this.selected = null; this.showDetails(null); }
    this.render();
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
    var m = this.model, g = el("g", { "class": "cv-axes" }, this.viewport);
    var right = m.width - MARGIN.right;
    var top = m.rowY(m.logitLayer) - m.rowH / 2, bottom = m.rowY(-1) + m.rowH / 2;
    for (var p = 0; p < m.nPos; p++) {
      if (p % 2 === 1) {
        el("rect", { x: m.colX[p], y: top, width: m.colW[p], height: bottom - top, "class": "cv-colband" }, g);
      }
    }
    var step = Math.max(1, Math.ceil(11 / Math.max(1, m.rowH)));
    m.rows.forEach(function (layer, i) {
      var y = m.rowY(layer);
      el("line", { x1: MARGIN.left - 4, x2: right, y1: y, y2: y, "class": "cv-gridline" }, g);
      var isEnd = layer === -1 || layer === m.logitLayer;
      if (!isEnd && (layer - m.minNeuronLayer) % step !== 0) { return; }
      var name = layer === -1 ? "Emb" : (layer === m.logitLayer ? "Logit" : "L" + layer);
      var t = el("text", { x: MARGIN.left - 7, y: y + 3.5, "text-anchor": "end", "class": "cv-axis-label" }, g);
      t.textContent = name;
    });
    /* the token axis, under the embedding row */
    var baseY = bottom + 8;
    var axis = el("g", { "class": "cv-token-axis" }, g);
    for (var q = 0; q < m.nPos; q++) {
      var cx = m.colX[q] + m.colW[q] / 2;
      var label = el("text", { x: cx, y: baseY, "text-anchor": "end", "class": "cv-token", "data-pos": q,
                               transform: "rotate(-50 " + cx + " " + baseY + ")" }, axis);
      label.textContent = clip(showToken(m.tokens[q]), 16) || String(q);
      var title = el("title", null, label);
      title.textContent = "position " + q + ": " + JSON.stringify(m.tokens[q] === undefined ? "" : m.tokens[q]);
    }
  };

  Viewer.prototype.drawNodes = function () {
    var self = this;
    this.model.nodes.forEach(function (n) {
      n.el = null;
      if (!n.visible) { return; }
      var g = el("g", { "class": "cv-node cv-" + n.type, "data-id": n.id, "data-cluster": n.clusterKey || "" }, self.nodeLayer);
      var shape;
      if (n.type === "embedding") {
        shape = el("rect", { x: n.x - n.r, y: n.y - n.r, width: 2 * n.r, height: 2 * n.r, rx: 1.5 }, g);
      } else if (n.type === "logit") {
        var r = n.r;
        shape = el("path", { d: "M" + n.x + " " + (n.y - r) + "L" + (n.x + r) + " " + n.y + "L" + n.x + " " + (n.y + r) + "L" + (n.x - r) + " " + n.y + "Z" }, g);
        var tok = el("text", { x: n.x, y: n.y - r - 14, "text-anchor": "middle", "class": "cv-logit-label" }, g);
        tok.textContent = "\"" + clip(showToken(n.token), 14) + "\"";
        if (isNum(n.prob)) {
          var pr = el("text", { x: n.x, y: n.y - r - 3, "text-anchor": "middle", "class": "cv-logit-prob" }, g);
          pr.textContent = (100 * n.prob).toFixed(n.prob < 0.1 ? 1 : 0) + "%";
        }
      } else {
        shape = el("circle", { cx: n.x, cy: n.y, r: n.r }, g);
      }
      shape.setAttribute("fill", n.type === "logit" ? "#fde68a" : n.colour);
      if (n.unlabelled) { g.classList.add("cv-unlabelled"); }
      n.el = g;
      g.addEventListener("mouseenter", function (ev) { self.showTooltip(n, ev); });
      g.addEventListener("mousemove", function (ev) { self.moveTooltip(ev); });
      g.addEventListener("mouseleave", function () { self.tooltip.style.display = "none"; });
      g.addEventListener("click", function (ev) { ev.stopPropagation(); self.select(n.id); });
    });
  };

  /* labels beside the strongest visible neurons, skipping any that would overlap a placed one */
  Viewer.prototype.drawLabels = function () {
    var layer = this.labelLayer, m = this.model;
    layer.textContent = "";
    this.labelled = [];
    if (!this.showLabels) { return; }
    var candidates = m.nodes.filter(function (n) { return n.visible && n.type === "neuron"; });
    candidates.sort(function (a, b) { return b.absAttr - a.absAttr || (a.id < b.id ? -1 : 1); });
    var boxes = [];
    m.nodes.forEach(function (n) {   /* logit labels are fixed obstacles */
      if (n.visible && n.type === "logit") { boxes.push({ x0: n.x - m.logitSlot / 2, x1: n.x + m.logitSlot / 2, y0: n.y - n.r - 26, y1: n.y + n.r }); }
    });
    var discs = candidates.map(function (n) { return { x0: n.x - n.r, x1: n.x + n.r, y0: n.y - n.r, y1: n.y + n.r }; });
    var placed = 0, limit = Math.min(LABELLED_NODES, candidates.length);
    for (var i = 0; i < candidates.length && placed < limit && i < 4 * LABELLED_NODES; i++) {
      var n = candidates[i];
      var own = discs[i];
      var text = clip(n.label || ("L" + n.layer + "/N" + n.raw.feature), LABEL_CHARS);
      /* right of the node, else left, above, below; skipped when all overlap a label or node */
      var t = el("text", { "class": "cv-node-label", "data-id": n.id }, layer);
      t.textContent = text;
      var spots = [[n.x + n.r + 3, n.y + 3.5, "start"], [n.x - n.r - 3, n.y + 3.5, "end"],
                   [n.x, n.y - n.r - 3, "middle"], [n.x, n.y + n.r + 10, "middle"]];
      var box = null;
      for (var k = 0; k < spots.length && !box; k++) {
        t.setAttribute("x", spots[k][0]);
        t.setAttribute("y", spots[k][1]);
        t.setAttribute("text-anchor", spots[k][2]);
        var bb = t.getBBox();
        var b = { x0: bb.x - 1, x1: bb.x + bb.width + 1, y0: bb.y, y1: bb.y + bb.height };
        var inside = b.x0 >= MARGIN.left && b.x1 <= m.width;   /* clear of the layer axis */
        if (inside && !boxes.some(overlapping(b, own)) && !discs.some(overlapping(b, own))) { box = b; }
      }
      if (!box) { layer.removeChild(t); continue; }
      boxes.push(box);
      this.labelled.push(n.id);
      placed++;
    }
  };

  function overlapping(box, own) {
    return function (b) { return b !== own && box.x0 < b.x1 && b.x0 < box.x1 && box.y0 < b.y1 && b.y0 < box.y1; };
  }

  Viewer.prototype.visibleEdges = function () {
    var out = [], t = this.threshold;
    var edges = this.model.edges;
    for (var i = 0; i < edges.length && edges[i].abs >= t; i++) {
      if (edges[i].source.visible && edges[i].target.visible) { out.push(edges[i]); }
    }
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
    var total = this.candidateEdges().length;
    var txt = fmt(this.threshold) + " \u2014 " + edges.length + " of " + total + " edges";
    if (drawn.length < edges.length) { txt += " (drawing the strongest " + drawn.length + ")"; }
    this.sliderText.textContent = txt;
  };

  /* ------------------------------------------------------------ zoom / pan */
  Viewer.prototype.installZoom = function () {
    var self = this, svg = this.svg;
    svg.addEventListener("wheel", function (ev) {
      ev.preventDefault();
      var rect = svg.getBoundingClientRect();
      var px = ev.clientX - rect.left, py = ev.clientY - rect.top;
      var z = self.zoom, k = Math.max(0.5, Math.min(40, z.k * Math.exp(-ev.deltaY * 0.0015)));
      z.x = px - (px - z.x) * k / z.k;
      z.y = py - (py - z.y) * k / z.k;
      z.k = k;
      self.applyZoom();
    }, { passive: false });
    var drag = null;
    svg.addEventListener("mousedown", function (ev) {
      if (ev.button !== 0) { return; }
      drag = { x: ev.clientX, y: ev.clientY, zx: self.zoom.x, zy: self.zoom.y };
      self.dragged = false;
    });
    window.addEventListener("mousemove", function (ev) {
      if (!drag) { return; }
      var dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) { self.dragged = true; svg.classList.add("cv-dragging"); }
      if (self.dragged) { self.zoom.x = drag.zx + dx; self.zoom.y = drag.zy + dy; self.applyZoom(); }
    });
    window.addEventListener("mouseup", function () {
      drag = null;
      svg.classList.remove("cv-dragging");
      setTimeout(function () { self.dragged = false; }, 0);
    });
    svg.addEventListener("dblclick", function (ev) { ev.preventDefault(); self.fit(); });
  };

  Viewer.prototype.applyZoom = function () {
    var z = this.zoom;
    this.viewport.setAttribute("transform", "translate(" + z.x.toFixed(2) + " " + z.y.toFixed(2) + ") scale(" + z.k.toFixed(4) + ")");
  };

  Viewer.prototype.fit = function () {
    this.zoom = { k: 1, x: 0, y: 0 };
    this.applyZoom();
  };

  /* ------------------------------------------------------------- selection */
  Viewer.prototype.neighbours = function (id) {
    var n = this.model.byId[id];
    if (!n || !n.visible) { return []; }
    var t = this.threshold, seen = {};
    n.inEdges.forEach(function (e) { if (e.abs >= t && e.source.visible) { seen[e.source.id] = true; } });
    n.outEdges.forEach(function (e) { if (e.abs >= t && e.target.visible) { seen[e.target.id] = true; } });
    delete seen[id];
    return Object.keys(seen).sort();
  };

  Viewer.prototype.select = function (id) {
    var n = this.model.byId[id];
    if (!n || !n.visible) { return false; }
    this.selected = id;
    this.focusCluster = null;
    this.applyHighlight();
    this.showDetails(n);
    this.fetchNeighbourhood(id);
    return true;
  };

  /* Big graphs (metadata.subgraph): the server sent a pruned first view; the clicked node's
     strongest incident edges and their other ends are fetched once and merged in (shown
     whatever their influence share). */
  Viewer.prototype.fetchNeighbourhood = function (id) {
    var sub = (this.data.metadata || {}).subgraph, self = this;
    if (!sub || !sub.neighbourhood || !window.fetch) { return; }
    this.fetched = this.fetched || {};
    if (this.fetched[id]) { return; }
    this.fetched[id] = "pending";
    this.pendingFetches = (this.pendingFetches || 0) + 1;
    fetch(sub.neighbourhood + "?node=" + encodeURIComponent(id)).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    }).then(function (part) {
      self.fetched[id] = "done";
      self.mergeNeighbourhood(part);
    }).catch(function (err) {
      self.fetched[id] = null;
      if (window.console) { console.warn("neighbourhood of " + id + ": " + err.message); }
    }).then(function () { self.pendingFetches -= 1; });
  };

  Viewer.prototype.mergeNeighbourhood = function (part) {
    var data = this.data, have = {}, links = {}, added = 0, self = this;
    this.pinned = this.pinned || {};
    data.nodes.forEach(function (n) { have[n.node_id] = true; });
    data.links.forEach(function (l) { links[l.source + "\u0000" + l.target] = true; });
    (part.nodes || []).forEach(function (n) {
      self.pinned[n.node_id] = true;
      if (!have[n.node_id]) { data.nodes.push(n); have[n.node_id] = true; added += 1; }
    });
    (part.links || []).forEach(function (l) {
      var key = l.source + "\u0000" + l.target;
      if (!links[key]) { data.links.push(l); links[key] = true; added += 1; }
    });
    var selected = this.selected, threshold = this.threshold;
    this.model = buildModel(data);
    this.applyNodeFilter();
    this.threshold = Math.min(threshold, this.neighbourhoodFloor(part));
    this.build();
    if (selected && this.model.byId[selected]) { this.select(selected); }
    this.merged = (this.merged || 0) + added;
  };

  /* the edge filter keeps at least the fetched edges of the clicked node */
  Viewer.prototype.neighbourhoodFloor = function (part) {
    var floor = Infinity;
    (part.links || []).forEach(function (l) { if (isNum(l.weight) && Math.abs(l.weight) > 0) { floor = Math.min(floor, Math.abs(l.weight)); } });
    return floor;
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
      m.nodes.forEach(function (n) { if (n.visible && n.clusterKey === self.focusCluster) { keep[n.id] = "neighbour"; } });
    }
    m.nodes.forEach(function (n) {
      if (!n.el) { return; }
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

  /* ----------------------------------------------------------------- panels */
  Viewer.prototype.nodeTitle = function (n) {
    if (n.type === "neuron") { return "L" + n.layer + "/N" + n.raw.feature + " @ " + n.pos; }
    if (n.type === "embedding") { return "embedding @ " + n.pos; }
    return "logit \"" + (n.token || "") + "\"";
  };

  Viewer.prototype.infoRows = function (n) {
    var rows = [];
    var cl = n.clusterKey ? this.model.clusterByKey[n.clusterKey].name : "";
    rows.push(["clerp", n.clerp]);
    if (n.type === "neuron") {
      rows.push(["label", n.label || (n.unlabelled ? "(unlabelled)" : "")]);
      if (n.inputLabel) { rows.push(["input", n.inputLabel]); }
    }
    rows.push(["token", showToken(n.token) + "  (pos " + n.pos + ")"]);
    if (n.type !== "logit") { rows.push(["activation", fmt(n.activation)]); }
    rows.push(["attribution", fmt(n.attribution)]);
    if (n.share !== null && n.type !== "logit") { rows.push(["influence", fmt(n.share) + " cumulative share"]); }
    if (n.type === "logit") { rows.push(["probability", fmt(n.prob)]); }
    if (cl) { rows.push(["cluster", cl]); }
    rows.push(["edges", n.inEdges.length + " in \u00b7 " + n.outEdges.length + " out"]);
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
    var self = this, legend = this.legend;
    legend.textContent = "";
    if (!this.model.clusters.length) {
      html("div", { "class": "cv-legend-title" }, "No clusters in this graph: blue nodes push the target up, red push it down", legend);
      return;
    }
    html("div", { "class": "cv-legend-title" }, "Clusters (click to focus)", legend);
    var singles = 0;
    this.model.clusters.forEach(function (c) {
      if (c.members.length < 2 && ++singles > 8) { return; }
      var chip = html("button", { type: "button", "class": "cv-chip", "data-cluster": c.key }, null, legend);
      var sw = html("span", { "class": "cv-swatch" }, null, chip);
      sw.style.background = c.colour;
      html("span", null, c.name + " (" + c.members.length + ")", chip);
      chip.addEventListener("click", function () { self.selectCluster(c.key); });
    });
    if (singles > 8) {
      html("span", { "class": "cv-legend-more" }, "+ " + (singles - 8) + " more single-neuron clusters", legend);
    }
  };

  Viewer.prototype.showDetails = function (n) {
    var self = this, side = this.side;
    side.textContent = "";
    if (!n) {
      html("div", { "class": "cv-side-title" }, "Click a node", side);
      html("p", { "class": "cv-hint" }, "Hover a node for its labels; click it to highlight its neighbours " +
        "(edges above the edge threshold). Click the background to clear. Node size ~ |attribution| (RelP); " +
        "blue edges excite, red inhibit. The node filter keeps the neurons that carry the given share " +
        "of the influence on the logits (as circuit-tracer and Neuronpedia prune).", side);
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
      var shown = edges.filter(function (e) { return other(e).visible; })
        .sort(function (a, b) { return b.abs - a.abs; }).slice(0, 12);
      if (!shown.length) { return; }
      html("div", { "class": "cv-side-sub" }, title, side);
      var ul = html("ul", { "class": "cv-links" }, null, side);
      shown.forEach(function (e) {
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
  function readJson(id) {
    var script = document.getElementById(id);
    return script ? JSON.parse(script.textContent) : null;
  }

  function boot() {
    var root = document.getElementById("cv-root");
    if (!root || !document.getElementById("circuits-graph")) { return; }
    var data, graphs;
    try {
      data = readJson("circuits-graph");
      graphs = readJson("circuits-graphs") || [];
    } catch (err) {
      root.textContent = "cannot parse the embedded graph: " + err.message;
      throw err;
    }
    var viewer = new Viewer(root, data, graphs);
    window.circuitsViewer = {
      viewer: viewer,
      nodeCount: function () { return viewer.model.nodes.length; },
      renderedNodeCount: function () { return viewer.nodeLayer.querySelectorAll("g.cv-node").length; },
      visibleNodeIds: function () { return viewer.model.nodes.filter(function (n) { return n.visible; }).map(function (n) { return n.id; }); },
      labelledNodeIds: function () { return viewer.labelled.slice(); },
      edgeCount: function () { return viewer.model.edges.length; },
      drawnEdgeCount: function () { return viewer.edgeLayer.querySelectorAll("path.cv-edge").length; },
      threshold: function () { return viewer.threshold; },
      setThreshold: function (t) { viewer.threshold = t; viewer.slider.value = String(viewer.sliderFromThreshold(t)); viewer.drawEdges(); viewer.applyHighlight(); },
      nodeThreshold: function () { return viewer.nodeThreshold; },
      setNodeThreshold: function (t) { viewer.setNodeThreshold(t); },
      neighbours: function (id) { return viewer.neighbours(id); },
      select: function (id) { return viewer.select(id); },
      clearSelection: function () { viewer.clearSelection(); },
      fit: function () { viewer.fit(); },
      clusterCount: function () { return viewer.model.clusters.length; },
      subgraph: function () { return (viewer.data.metadata || {}).subgraph || null; },
      pendingFetches: function () { return viewer.pendingFetches || 0; },
      mergedCount: function () { return viewer.merged || 0; }
    };
    document.documentElement.setAttribute("data-viewer-ready", "1");
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", boot);
  } else {
    boot();
  }
})();
