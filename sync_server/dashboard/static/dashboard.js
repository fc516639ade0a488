// sync-server dashboard: draws the model page's charts from series.json (Chart.js, vendored; see VENDORED.md).
"use strict";
(function () {
  const box = document.getElementById("charts");
  if (!box || typeof Chart === "undefined") return;
  const status = document.getElementById("charts-status");
  const palette = ["#2458c6", "#d1495b", "#2a9d8f", "#e9a23b", "#7b4fb5", "#5c6b73", "#c1666b", "#3d8b37"];
  const colours = new Map();
  function colour(label) {
    const key = label.replace(/ p(50|99)$/, "");
    if (!colours.has(key)) colours.set(key, palette[colours.size % palette.length]);
    return colours.get(key);
  }
  function hourLabel(iso) {
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, "0");
    return `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
  }
  function draw(body) {
    const labels = body.buckets.map(hourLabel);
    let drawn = 0;
    for (const canvas of box.querySelectorAll("canvas[data-chart]")) {
      const key = canvas.dataset.chart;
      const sets = body.charts[key] || [];
      const empty = canvas.closest("figure").querySelector(".empty");
      if (!sets.length) { empty.hidden = false; continue; }
      const share = canvas.dataset.unit === "share";
      new Chart(canvas, {
        type: "line",
        data: {
          labels,
          datasets: sets.map((s) => ({
            label: s.label,
            data: share ? s.data.map((v) => (v === null ? null : v * 100)) : s.data,
            borderColor: colour(s.label),
            backgroundColor: colour(s.label),
            borderDash: s.mode === "shadow" || / p99$/.test(s.label) ? [5, 4] : [],
            spanGaps: true,
            pointRadius: 2,
            tension: 0.2,
          })),
        },
        options: {
          animation: false,
          maintainAspectRatio: false,
          interaction: { mode: "index", intersect: false },
          scales: { y: { beginAtZero: true, ticks: { callback: (v) => (share ? v + " %" : v) } }, x: { ticks: { maxTicksLimit: 8 } } },
          plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
        },
      });
      drawn += 1;
    }
    box.dataset.drawn = String(drawn);
    status.textContent = body.buckets.length ? "" : "No telemetry in this range yet.";
  }
  fetch(box.dataset.seriesUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`series: HTTP ${r.status}`))))
    .then(draw)
    .catch((err) => { status.textContent = "The charts could not be loaded: " + err.message; box.dataset.drawn = "error"; });
})();
