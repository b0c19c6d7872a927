// A real sidecar process for the adapter's tests, and a polling wait.
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const HERE = path.dirname(fileURLToPath(import.meta.url))
export const REPO = path.resolve(HERE, '..', '..', '..')
export const PYTHON = process.env.WA_SIDECAR_PYTHON || path.join(REPO, '.venv', 'bin', 'python')
export const TOKEN = 'runtime-token-for-tests'

// What a test file starts, stopped after its last test in reverse order: `const cleanups = cleanupsAfter(after)`.
export function cleanupsAfter(after) {
  const cleanups = []
  after(async () => {
    for (const cleanup of cleanups.reverse()) await cleanup()
  })
  return cleanups
}

export async function eventually(condition, what, deadlineMs = 20_000) {
  const end = Date.now() + deadlineMs
  for (;;) {
    const value = await condition()
    if (value) return value
    if (Date.now() > end) throw new Error(`not within ${deadlineMs} ms: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

export async function startSidecar(port = 0, extraArgs = []) {
  const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'wa-adapter-'))
  const child = spawn(PYTHON, ['-m', 'sidecar', 'serve', '--listen', `127.0.0.1:${port}`, '--closure-log', path.join(stateDir, 'closures.jsonl'), ...extraArgs], {
    cwd: REPO,
    env: { ...process.env, WA_SIDECAR_RUNTIME_TOKEN: TOKEN, WA_SIDECAR_API_TOKEN: 'api-token-for-the-tests' },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let output = ''
  child.stdout.on('data', (chunk) => { output += chunk })
  child.stderr.on('data', (chunk) => { output += chunk })
  const base = await eventually(() => {
    const line = output.split('\n').find((l) => l.includes('"msg":"serving"'))
    return line && JSON.parse(line).listen
  }, `sidecar started: ${output}`)
  return {
    base, child, stateDir,
    ws: base.replace('http://', 'ws://') + '/v1/runtime',
    log: () => output,
    async get(p) { return (await fetch(base + p)).json() },
    async metrics() { return (await fetch(base + '/metrics')).text() },
    async post(p, body, token = 'api-token-for-the-tests') {
      const response = await fetch(base + p, { method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' }, body: JSON.stringify(body ?? {}) })
      return { status: response.status, body: await response.json() }
    },
    decisions(name) {
      const file = path.join(stateDir, 'closures.jsonl')
      const lines = fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)) : []
      return lines.filter((entry) => entry.decision === name)
    },
    async stop() { child.kill('SIGTERM'); await new Promise((resolve) => child.once('exit', resolve)) },
  }
}
