// Behaviour of the hub's pages. Copy buttons: <button data-copy="ID"> copies the text of the element with that id.
// A file of its own, not an inline handler: the pages' Content-Security-Policy allows no inline script.
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", () => {
      const source = document.getElementById(button.dataset.copy);
      if (source && navigator.clipboard) {
        navigator.clipboard.writeText(source.innerText);
      }
      button.textContent = "Copied";
    });
  }
  // Filter menus submit their form when changed.
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.submit());
  }
});
