// The filter forms submit themselves when a menu changes; typing in a text box (a name, a YYYY-MM-DD date) waits
// for Enter. The dates are plain text on purpose: a date picker shows the browser's locale, and every date here is
// ISO and UTC.
"use strict";
document.querySelectorAll("form.filters").forEach((form) => {
  form.querySelectorAll("select").forEach((field) => {
    field.addEventListener("change", () => form.requestSubmit());
  });
});
