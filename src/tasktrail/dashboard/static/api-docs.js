// Starts the API docs page (/schema) with the vendored Swagger UI bundle.
// A file of its own, not an inline script, so the page's CSP can allow scripts from this origin only.
"use strict";

(() => {
  const root = document.getElementById("api-docs");
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content;
  window.SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis, window.SwaggerUIStandalonePreset],
    layout: "BaseLayout",
    // The validator badge would send the schema's address to a third party.
    validatorUrl: null,
    // Signed in to the dashboard, the session cookie authenticates "try it out"; a write also
    // needs the session's CSRF token (see http/sessions.py).
    requestInterceptor: (request) => {
      if (csrf) request.headers["X-CSRF-Token"] = csrf;
      return request;
    },
  });
})();
