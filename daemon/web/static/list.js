// The filter forms submit themselves when a menu or a date changes; typing in a text box waits for Enter.
"use strict";
document.querySelectorAll("form.filters").forEach((form) => {
  form.querySelectorAll("select, input[type=date]").forEach((field) => {
    field.addEventListener("change", () => form.requestSubmit());
  });
});
