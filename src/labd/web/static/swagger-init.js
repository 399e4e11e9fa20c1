// Start Swagger UI on /docs from local files (no inline script, no CDN, no validator badge).
(function () {
  "use strict";
  var node = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: node.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    oauth2RedirectUrl: window.location.origin + node.dataset.oauth2RedirectUrl,
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    // A browser signed in to the dashboard may try the API with its session cookie, which
    // the server accepts only with this header (docs/security.md); "Authorize" still works.
    requestInterceptor: function (request) { request.headers["X-Labd-UI"] = "1"; return request; },
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
})();
