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
    /* a page that answers a form post names its own address (data-canonical-url): the
       address bar shows it, and reloading fetches that page instead of posting the form
       a second time (which would queue the same device operation again) */
    var canonical = document.body.getAttribute("data-canonical-url");
    if (canonical && canonical.charAt(0) === "/" && window.history.replaceState) {
      window.history.replaceState(null, "", canonical);
    }

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

  /* package upload with a progress bar: the file is the raw request body, the optional
     name/version/destination fields go in the query string */
  function showMessage(html) {
    var box = document.getElementById("messages");
    if (box) box.innerHTML = html; /* server-rendered, escaped HTML fragment */
  }

  function showError(text) {
    var p = document.createElement("p");
    p.className = "alert alert-error";
    p.setAttribute("role", "alert");
    p.textContent = text;
    var box = document.getElementById("messages");
    if (box) box.replaceChildren(p);
  }

  /* an answer that is not one of the console's fragments: the JSON of the request guard
     (413 before the console saw the body), or anything else a proxy in front says */
  function errorText(xhr) {
    try {
      var body = JSON.parse(xhr.responseText);
      if (body && typeof body.detail === "string") return body.detail;
    } catch (e) { /* not JSON */ }
    return "the server answered " + xhr.status + (xhr.statusText ? " " + xhr.statusText : "");
  }

  function formatBytes(n) {
    var units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  /* after an upload: the package list and the deploy form (its package choices) anew */
  function refreshSoftware() {
    var ids = ["package-list", "deploy-card"];
    fetch(window.location.pathname, { headers: { "HX-Request": "true" }, credentials: "same-origin" })
      .then(function (resp) { return resp.ok ? resp.text() : Promise.reject(resp.status); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        ids.forEach(function (id) {
          var fresh = doc.getElementById(id);
          var old = document.getElementById(id);
          if (fresh && old) {
            old.replaceWith(document.importNode(fresh, true));
            if (window.htmx) htmx.process(document.getElementById(id));
          }
        });
      })
      .catch(function () { /* the lists stay as they were; a reload shows them */ });
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!form.matches || !form.matches("form[data-upload]") || ev.defaultPrevented) return;
    ev.preventDefault();
    var input = form.querySelector("input[type=file]");
    var bar = form.querySelector("progress");
    var status = form.querySelector(".upload-status");
    var button = form.querySelector("button[type=submit]");
    if (!input.files.length) return;
    var file = input.files[0];
    var max = Number(form.getAttribute("data-max-bytes") || 0);
    if (max && file.size > max) {
      bar.hidden = true;
      status.textContent = "";
      showError(file.name + " is " + formatBytes(file.size) + "; the server accepts at most " +
                formatBytes(max) + ". Use custos pkg upload on the server for larger files.");
      return;
    }
    var query = new URLSearchParams({ filename: file.name });
    ["name", "version", "destination"].forEach(function (field) {
      var el = form.elements.namedItem(field);
      if (el && el.value.trim()) query.set(field, el.value.trim());
    });
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.getAttribute("data-upload") + "?" + query.toString());
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    /* the server then answers with fragments for #messages, errors included */
    xhr.setRequestHeader("HX-Request", "true");
    bar.hidden = false;
    bar.value = 0;
    button.disabled = true;
    showMessage("");
    status.textContent = "Uploading " + file.name + "…";
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable && e.total) {
        bar.value = Math.round((100 * e.loaded) / e.total);
        status.textContent = "Uploading " + file.name + ": " + bar.value + "%";
      }
    });
    xhr.addEventListener("load", function () {
      button.disabled = false;
      var redirect = xhr.getResponseHeader("HX-Redirect");
      if (redirect) { /* the session ended: sign in again */
        window.location.assign(redirect);
        return;
      }
      var type = xhr.getResponseHeader("Content-Type") || "";
      if (type.indexOf("text/html") === 0) showMessage(xhr.responseText);
      else showError("Upload refused: " + errorText(xhr));
      if (xhr.status === 201) {
        bar.value = 100; /* every byte arrived, even if no last progress event came */
        status.textContent = "Upload finished: " + file.name + " (100%).";
        form.reset();
        refreshSoftware();
      } else {
        bar.hidden = true;
        status.textContent = "Upload failed.";
      }
    });
    xhr.addEventListener("error", function () {
      button.disabled = false;
      bar.hidden = true;
      status.textContent = "Upload failed.";
      showError("The upload of " + file.name + " failed: the connection was lost.");
    });
    xhr.send(file);
  });
})();
