// Builds the /join/ page into the Python package (rescue/tokenservice/web/), reproducibly: the
// same lock file gives the same bytes (tests/test_web_bundle.py rebuilds and compares).
//   node build.mjs [--out DIR]
import { build } from 'esbuild'
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const at = process.argv.indexOf('--out')
const out = resolve(at > 0 ? process.argv[at + 1] : join(here, '..', 'rescue', 'tokenservice', 'web'))
mkdirSync(out, { recursive: true })

await build({
  entryPoints: [join(here, 'src', 'join.js')],
  outfile: join(out, 'join.js'),
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: ['es2022'],
  minify: true,
  legalComments: 'eof',
  charset: 'utf8',
  absWorkingDir: here,
  logLevel: 'warning'
})
copyFileSync(join(here, 'page', 'index.html'), join(out, 'index.html'))
copyFileSync(join(here, 'page', 'join.css'), join(out, 'join.css'))
copyFileSync(join(here, 'node_modules', '@xterm', 'xterm', 'css', 'xterm.css'), join(out, 'xterm.css'))
const lock = JSON.parse(readFileSync(join(here, 'package-lock.json')))
const versions = Object.fromEntries(['@xterm/xterm', '@xterm/addon-fit', 'cborg', 'libsodium-wrappers-sumo', 'esbuild']
  .map((name) => [name, lock.packages[`node_modules/${name}`].version]))
writeFileSync(join(out, 'BUILD.json'), JSON.stringify({ built_by: 'web/build.mjs', versions }, null, 2) + '\n')
