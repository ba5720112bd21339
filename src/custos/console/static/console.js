/* Custos console: small progressive enhancements. Every page works without this file except
   the upload progress bar; no build step, no inline script (the CSP forbids it). */
(function () {
  "use strict";
  document.documentElement.classList.replace("no-js", "js");

  function ready(fn) {
    if (document.readyState !== "loading") fn();
    else document.addEventListener("DOMContentLoaded", fn);
  }

  function csrfToken() {
    var raw = document.body.getAttribute("hx-headers");
    try { return raw ? JSON.parse(raw)["X-CSRF-Token"] : ""; } catch (e) { return ""; }
  }

  ready(function () {
    /* mobile navigation: a disclosure button */
    var toggle = document.querySelector(".nav-toggle");
    var nav = document.getElementById("site-nav");
    if (toggle && nav) {
      toggle.addEventListener("click", function () {
        var open = toggle.getAttribute("aria-expanded") === "true";
        toggle.setAttribute("aria-expanded", String(!open));
        nav.classList.toggle("open", !open);
      });
      document.addEventListener("keydown", function (ev) {
        if (ev.key === "Escape" && nav.classList.contains("open")) {
          nav.classList.remove("open");
          toggle.setAttribute("aria-expanded", "false");
          toggle.focus();
        }
      });
    }
  });

  /* confirmation before destructive actions (forms with data-confirm) */
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var message = form.getAttribute && form.getAttribute("data-confirm");
    if (message && !window.confirm(message)) ev.preventDefault();
  }, true);

  /* copy buttons */
  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest && ev.target.closest("button[data-copy]");
    if (!btn) return;
    var field = document.getElementById(btn.getAttribute("data-copy"));
    if (!field) return;
    var done = function () {
      var old = btn.textContent;
      btn.textContent = "Copied";
      setTimeout(function () { btn.textContent = old; }, 2000);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, function () { field.select(); });
    } else {
      field.select();
      try { document.execCommand("copy"); done(); } catch (e) { /* selected: the user copies */ }
    }
  });

  /* package upload with a progress bar: the file is the raw request body */
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!form.matches || !form.matches("form[data-upload]") || ev.defaultPrevented) return;
    ev.preventDefault();
    var input = form.querySelector("input[type=file]");
    var bar = form.querySelector("progress");
    var status = form.querySelector("[role=status]");
    var button = form.querySelector("button[type=submit]");
    if (!input.files.length) return;
    var file = input.files[0];
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.getAttribute("data-upload") + "?filename=" + encodeURIComponent(file.name));
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    bar.hidden = false;
    bar.value = 0;
    button.disabled = true;
    status.textContent = "Uploading " + file.name + "…";
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) {
        bar.value = Math.round((100 * e.loaded) / e.total);
        status.textContent = "Uploading " + file.name + ": " + bar.value + "%";
      }
    });
    xhr.addEventListener("load", function () {
      button.disabled = false;
      var box = document.getElementById("messages");
      box.innerHTML = xhr.responseText; /* server-rendered, escaped HTML fragment */
      if (xhr.status === 201) {
        status.textContent = "Upload finished.";
        if (window.htmx) {
          htmx.ajax("GET", window.location.pathname, { target: "#package-list", select: "#package-list", swap: "outerHTML" });
        }
      } else {
        status.textContent = "Upload failed.";
        bar.hidden = true;
      }
    });
    xhr.addEventListener("error", function () {
      button.disabled = false;
      bar.hidden = true;
      status.textContent = "Upload failed: the connection was lost.";
    });
    xhr.send(file);
  });
})();
