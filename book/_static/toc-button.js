// The article header's "Contents" button opens the page's table of contents (see code-width.css).
//
// pydata-sphinx-theme 0.17 wires only the first `.secondary-toggle` of the page to the drawer, and under
// sphinx-book-theme 1.3 that is the hidden one in the top navbar: the visible button in the article header did
// nothing. This hands its clicks to the wired one, and closes the drawer once a section in it is chosen.
document.addEventListener("DOMContentLoaded", () => {
  const [wired, ...others] = document.querySelectorAll(".secondary-toggle");
  if (!wired) return;
  others.forEach((button) =>
    button.addEventListener("click", (event) => {
      event.preventDefault();
      wired.click();
    }),
  );
  const drawer = document.getElementById("pst-secondary-sidebar-modal");
  if (drawer) {
    drawer.addEventListener("click", (event) => {
      if (event.target.closest("a[href]")) drawer.close();
    });
  }
});
