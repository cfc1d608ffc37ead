// Builds the page into dist/: index.html plus content-hashed assets, no inline scripts or
// styles (the server's CSP allows only 'self'), and no source maps, so that a rebuild of
// the same sources gives the same bytes (CI compares the committed dist/).
import { defineConfig } from 'vite';

export default defineConfig({
  base: '/',
  oxc: {
    jsx: { runtime: 'automatic', importSource: 'preact' },
  },
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    sourcemap: false,
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    target: 'es2022',
  },
});
