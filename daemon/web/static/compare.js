// The job page's image viewer: a before/after slider with zoom to 1:1 pixels, and a side-by-side view.
//
// The output lies over the input and is clipped at the split (clip-path: inset), so the input shows left of the
// split and the output right of it; both are stretched to the same box, so a pixel of the input covers `scale`
// pixels of the output ("show pixels" keeps them square instead of smoothing them). The divider carries a round
// handle. Side by side, every pane shows its image at the same size (the output's, times the zoom), and scrolling
// one pane scrolls the others to the same place, so the same detail is under the eye in each. The markup has no
// inline style (the page's Content-Security-Policy forbids it); styles set here through the CSSOM are allowed.
"use strict";
(function () {
  function init(viewer) {
    const W = Number(viewer.dataset.width) || 1;
    const H = Number(viewer.dataset.height) || 1;
    const viewport = viewer.querySelector(".viewport");
    const stage = viewer.querySelector(".stage");
    const after = viewer.querySelector("img.after");
    const before = viewer.querySelector("img.before");
    const divider = viewer.querySelector(".divider");
    const range = viewer.querySelector("input.split");
    const side = viewer.querySelector(".side");
    const panes = side ? Array.from(side.querySelectorAll(".pane")) : [];
    let zoom = "fit";
    let dragging = false;

    function setSplit(f) {
      f = Math.min(1, Math.max(0, f));
      viewer.dataset.split = f.toFixed(3);
      if (!before) return;
      const pct = (f * 100).toFixed(2) + "%";
      after.style.clipPath = "inset(0 0 0 " + pct + ")";
      divider.style.left = pct;
      if (range) range.value = String(Math.round(f * 1000));
    }

    function layoutSide() {
      panes.forEach((pane) => {
        const img = pane.querySelector("img");
        if (zoom === "fit") {
          img.style.width = "100%";
          img.style.height = "auto";
          return;
        }
        const width = (W * Number(zoom)) / (window.devicePixelRatio || 1);
        img.style.width = width.toFixed(2) + "px";
        img.style.height = ((width * H) / W).toFixed(2) + "px";
      });
      viewer.dataset.zoom = zoom;
    }

    // A scroll in one pane puts the others at the same offset (their images have the same size). Setting an offset
    // a pane already has fires no event, so the echo stops there.
    panes.forEach((pane) => {
      pane.addEventListener("scroll", () => {
        panes.forEach((other) => {
          if (other === pane) return;
          if (other.scrollLeft !== pane.scrollLeft) other.scrollLeft = pane.scrollLeft;
          if (other.scrollTop !== pane.scrollTop) other.scrollTop = pane.scrollTop;
        });
      });
    });

    function layout() {
      if (viewer.dataset.view === "side") {
        layoutSide();
        return;
      }
      let width;
      if (zoom === "fit") {
        const maxHeight = Math.max(240, window.innerHeight * 0.75);
        width = Math.min(viewer.clientWidth - 2 || W, (W * maxHeight) / H);
      } else {
        // One image pixel per device pixel at 1:1, whatever the screen's pixel ratio.
        width = (W * Number(zoom)) / (window.devicePixelRatio || 1);
      }
      stage.style.width = width.toFixed(2) + "px";
      stage.style.height = ((width * H) / W).toFixed(2) + "px";
      viewer.dataset.zoom = zoom;
      // The slider below spans what is on screen of the image, so that its thumb sits under the split.
      if (range) range.style.width = Math.min(width, viewer.clientWidth) + "px";
      // Keep the split in view when zooming in.
      const split = Number(viewer.dataset.split) || 0.5;
      viewport.scrollLeft = Math.max(0, split * width - viewport.clientWidth / 2);
    }

    function press(selector, button) {
      viewer.querySelectorAll(selector).forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
    }

    function splitAt(event) {
      const rect = stage.getBoundingClientRect();
      setSplit((event.clientX - rect.left) / rect.width);
    }

    if (before) {
      stage.addEventListener("pointerdown", (event) => {
        dragging = true;
        stage.setPointerCapture(event.pointerId);
        splitAt(event);
        event.preventDefault();
      });
      stage.addEventListener("pointermove", (event) => { if (dragging) splitAt(event); });
      const stop = () => { dragging = false; };
      stage.addEventListener("pointerup", stop);
      stage.addEventListener("pointercancel", stop);
    }
    if (range) range.addEventListener("input", () => setSplit(Number(range.value) / 1000));

    viewer.querySelectorAll("[data-zoom]").forEach((button) => {
      button.addEventListener("click", () => {
        zoom = button.dataset.zoom;
        press("[data-zoom]", button);
        layout();
      });
    });
    viewer.querySelectorAll("[data-view]").forEach((button) => {
      button.addEventListener("click", () => {
        const sideBySide = button.dataset.view === "side";
        press("[data-view]", button);
        side.hidden = !sideBySide;
        viewport.hidden = sideBySide;
        if (range) range.hidden = sideBySide;
        viewer.dataset.view = button.dataset.view;
        layout();
      });
    });
    const pixels = viewer.querySelector("[data-role=pixelated]");
    if (pixels) pixels.addEventListener("change", () => viewer.classList.toggle("pixelated", pixels.checked));
    const choice = viewer.querySelector("select[data-role=before]");
    if (choice && before) {
      choice.addEventListener("change", () => {
        before.src = choice.value;
        const tag = viewer.querySelector("[data-role=before-tag]");
        if (tag) tag.textContent = choice.selectedOptions[0].textContent.split(" ")[0];
      });
    }
    window.addEventListener("resize", () => { if (zoom === "fit") layout(); });
    layout();
    setSplit(Number(viewer.dataset.split) || 0.5);
    viewer.dataset.ready = "1";
  }

  document.querySelectorAll(".viewer").forEach(init);
})();
