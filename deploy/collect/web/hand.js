// A hand as SVG: palm and five fingers; a finger's flexion (0 = open .. 1 = flexed)
// shortens it as a curled finger looks from the front.  No library: the page
// must work offline on the device.
"use strict";
var NeurohandHand = (function () {
  var SVG = "http://www.w3.org/2000/svg";
  // Finger layout: x of the base, length when straight, width; the thumb leans out.
  var FINGERS = [
    {name: "thumb", x: 40, y: 150, length: 70, width: 22, angle: -50},
    {name: "index", x: 68, y: 118, length: 92, width: 20, angle: -6},
    {name: "middle", x: 96, y: 114, length: 102, width: 20, angle: 0},
    {name: "ring", x: 124, y: 118, length: 94, width: 19, angle: 5},
    {name: "little", x: 150, y: 126, length: 74, width: 17, angle: 11}
  ];
  function el(name, attrs) {
    var node = document.createElementNS(SVG, name);
    for (var key in attrs) { node.setAttribute(key, attrs[key]); }
    return node;
  }
  function build(svg) {
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    svg.appendChild(el("rect", {"class": "palm", x: 52, y: 112, width: 112, height: 110, rx: 26}));
    var parts = [];
    FINGERS.forEach(function (f) {
      var group = el("g", {transform: "rotate(" + f.angle + " " + f.x + " " + f.y + ")"});
      group.appendChild(el("rect", {"class": "finger-ghost", x: f.x - f.width / 2, y: f.y - f.length,
                                    width: f.width, height: f.length, rx: f.width / 2}));
      var finger = el("rect", {"class": "finger", x: f.x - f.width / 2, y: f.y - f.length, width: f.width,
                               height: f.length, rx: f.width / 2, "data-finger": f.name});
      group.appendChild(finger);
      svg.appendChild(group);
      parts.push({spec: f, node: finger});
    });
    svg.neurohandParts = parts;
  }
  function draw(svg, flexion) {
    if (!svg.neurohandParts) { build(svg); }
    svg.neurohandParts.forEach(function (part, i) {
      var value = flexion && flexion[i] !== null && flexion[i] !== undefined ? flexion[i] : 0;
      value = Math.max(0, Math.min(1, value));
      var length = part.spec.length * (1 - 0.72 * value);
      part.node.setAttribute("y", part.spec.y - length);
      part.node.setAttribute("height", length);
      part.node.setAttribute("data-flexion", value.toFixed(2));
    });
    svg.setAttribute("data-flexion", (flexion || []).map(function (v) {
      return v === null || v === undefined ? "" : Number(v).toFixed(2);
    }).join(","));
  }
  return {draw: draw};
})();
