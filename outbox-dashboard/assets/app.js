// Live refresh: every few seconds, fetch the page's <main> again and swap it in, unless the
// operator paused it, is typing in a form or has ticked a box.
(function () {
  var main = document.querySelector("main[data-refresh]");
  if (!main) return;
  var every = (parseInt(main.getAttribute("data-refresh"), 10) || 5) * 1000;
  var pause = document.getElementById("pause");
  function busy() {
    var a = document.activeElement;
    if (a && a !== document.body && main.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName)) return true;
    return !!main.querySelector("input[type=checkbox]:checked");
  }
  setInterval(function () {
    if ((pause && pause.checked) || document.hidden || busy()) return;
    fetch(location.href, { headers: { "X-Outbox-Fragment": "1" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) { main.innerHTML = html; main.removeAttribute("data-stale"); })
      .catch(function () { main.setAttribute("data-stale", "1"); });
  }, every);
})();
