// Every frame the adapter sends to the sidecar is checked against the runtime link's JSON Schema
// (runtime-link.schema.json, generated from sidecar/events/schema.py) by ajv, a validator of its own.
import { createRequire } from 'node:module'
import Ajv2020 from 'ajv/dist/2020.js'

const require = createRequire(import.meta.url)
const WebSocket = require('ws')
const schema = require('../runtime-link.schema.json')

const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/
const ajv = new Ajv2020({ strict: false, allErrors: true })
ajv.addFormat('date-time', RFC3339)
export const validateFrame = ajv.compile(schema)
const { $id, ...anonymous } = schema
export const validateCommand = ajv.compile({ ...anonymous, $ref: '#/$defs/SidecarMessage' })

export const checked = { frames: 0, commands: 0, violations: [] }

// Frames to a sidecar's runtime link only (the WhatsApp stand-in's traffic is Baileys' own binary protocol).
const send = WebSocket.prototype.send
WebSocket.prototype.send = function (data, ...rest) {
  if (typeof this.url === 'string' && this.url.endsWith('/v1/runtime') && typeof data === 'string') {
    checked.frames += 1
    if (!validateFrame(JSON.parse(data))) checked.violations.push({ data, errors: validateFrame.errors })
    if (!this.__commandsChecked) {
      this.__commandsChecked = true
      this.on('message', (raw) => {
        checked.commands += 1
        const message = JSON.parse(raw.toString())
        if (!validateCommand(message)) checked.violations.push({ command: message, errors: validateCommand.errors })
      })
    }
  }
  return send.call(this, data, ...rest)
}
