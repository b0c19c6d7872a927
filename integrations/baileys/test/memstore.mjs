import * as B from '@whiskeysockets/baileys'

// An in-memory key store of the shape makeWASocket's auth.keys has.
export function memStore() {
  const data = {}
  return {
    data,
    keys: {
      async get(type, ids) {
        const out = {}
        for (const id of ids) {
          let value = data[type]?.[id]
          if (value !== undefined && value !== null) {
            if (type === 'app-state-sync-key') value = B.proto.Message.AppStateSyncKeyData.fromObject(value)
            out[id] = value
          }
        }
        return out
      },
      async set(changes) {
        for (const type in changes) {
          data[type] ??= {}
          for (const id in changes[type]) {
            if (changes[type][id]) data[type][id] = changes[type][id]
            else delete data[type][id]
          }
        }
      },
    },
  }
}
