/* asyncsync run browser: sorting, filtering and refreshing the runs table, drawing the
   training curves with uPlot, copying the pull command. Text from the bucket is only ever
   set with textContent (or arrives as HTML this server escaped). */
(function () {
  "use strict";
  var COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

  // -- the runs table ------------------------------------------------------------------
  var table = document.getElementById("runs");
  var sortColumn = null, sortDirection = 1;

  function applyView() {
    if (!table) return;
    var body = table.tBodies[0];
    var text = (document.getElementById("filter").value || "").toLowerCase();
    var status = document.getElementById("status-filter").value;
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (row) {
      var shown = (!status || row.dataset.status === status) &&
        (!text || row.textContent.toLowerCase().indexOf(text) >= 0);
      row.hidden = !shown;
    });
    if (sortColumn !== null) {
      var header = table.tHead.rows[0].cells[sortColumn];
      var numeric = header.dataset.sort === "number";
      rows.sort(function (a, b) {
        var x = a.cells[sortColumn].dataset.value, y = b.cells[sortColumn].dataset.value;
        if (numeric) return (parseFloat(x) - parseFloat(y)) * sortDirection;
        return x.localeCompare(y) * sortDirection;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    }
  }

  if (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell, index) {
      if (!cell.dataset.sort) return;
      function sort() {
        sortDirection = sortColumn === index ? -sortDirection : 1;
        sortColumn = index;
        Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) {
          c.removeAttribute("aria-sort");
        });
        cell.setAttribute("aria-sort", sortDirection > 0 ? "ascending" : "descending");
        applyView();
      }
      cell.addEventListener("click", sort);
      cell.addEventListener("keydown", function (e) { if (e.key === "Enter") sort(); });
    });
    document.getElementById("filter").addEventListener("input", applyView);
    document.getElementById("status-filter").addEventListener("change", applyView);
  }

  function refreshTable() {
    var checked = {};
    Array.prototype.forEach.call(table.querySelectorAll("input[name=run]:checked"),
      function (box) { checked[box.value] = true; });
    fetch(location.href, {headers: {"Accept": "text/html"}, credentials: "same-origin"})
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (html) {
        if (!html) return;
        var page = new DOMParser().parseFromString(html, "text/html");
        var fresh = page.querySelector("#runs tbody");
        if (!fresh) return;
        table.replaceChild(document.importNode(fresh, true), table.tBodies[0]);
        Array.prototype.forEach.call(table.querySelectorAll("input[name=run]"),
          function (box) { box.checked = !!checked[box.value]; });
        var stamp = page.getElementById("updated");
        if (stamp) document.getElementById("updated").textContent = stamp.textContent;
        document.body.dataset.refresh = page.body.dataset.refresh || "";
        applyView();
      })
      .catch(function () {});
  }

  if (document.body.dataset.refresh !== undefined) {
    setInterval(function () {
      if (!document.body.dataset.refresh || document.hidden) return;
      if (table) refreshTable(); else location.reload();
    }, table ? 10000 : 30000);
  }

  // -- charts ----------------------------------------------------------------------------
  window.asyncsyncCharts = {};
  var dataElement = document.getElementById("run-data");
  var holder = document.getElementById("charts");
  if (dataElement && holder && window.uPlot) {
    var data = JSON.parse(dataElement.textContent);
    data.charts.forEach(function (chart) {
      var box = document.createElement("div");
      box.className = "chart";
      box.dataset.chart = chart.title;
      holder.appendChild(box);
      var options = {
        title: chart.title,
        width: Math.max(320, Math.min(holder.clientWidth, 720)),
        height: 240,
        scales: {x: {time: false}},
        axes: [{label: "epoch"}, {}],
        series: [{label: "epoch"}].concat(chart.series.map(function (series, index) {
          return {label: series.label, stroke: COLORS[index % COLORS.length], width: 2,
                  spanGaps: true, points: {show: data.epochs.length < 60}};
        })),
      };
      var values = [data.epochs].concat(chart.series.map(function (s) { return s.values; }));
      window.asyncsyncCharts[chart.title] = new window.uPlot(options, values, box);
    });
  }

  // -- the pull command --------------------------------------------------------------------
  var copy = document.getElementById("copy-pull");
  if (copy) {
    copy.addEventListener("click", function () {
      var text = document.getElementById("pull").textContent;
      if (navigator.clipboard) {
        navigator.clipboard.writeText(text).then(function () { copy.textContent = "copied"; },
                                                 function () {});
      }
    });
  }
})();
