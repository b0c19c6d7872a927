// Genuine Signal failures for the adapter's tests: two real Signal parties built with Baileys' libsignal
// repository, and tampered messages decrypted by Baileys' own decryptMessageNode, which yields the CIPHERTEXT stub
// a live socket upserts.
import { createRequire } from 'node:module'
import * as B from '@whiskeysockets/baileys'
import pino from 'pino'
import { memStore } from './memstore.mjs'

const require = createRequire(import.meta.url)
const quiet = pino({ level: 'silent' })

export function party(jid) {
  const creds = B.initAuthCreds()
  creds.me = { id: jid, name: 'x' }
  const store = memStore()
  const auth = { creds, keys: B.addTransactionCapability(store.keys, quiet, { maxCommitRetries: 2, delayBetweenTriesMs: 10 }) }
  const pnToLid = async (pns) => pns.map((pn) => ({ pn, lid: '2' + pn.split('@')[0].slice(1) + '7@lid' }))
  return { jid, creds, store, auth, repo: B.DEFAULT_CONNECTION_CONFIG.makeSignalRepository(auth, quiet, pnToLid) }
}

export async function bundleOf(p) {
  const { update, preKeys } = await B.getNextPreKeys(p.auth, 3)
  Object.assign(p.creds, update)
  const [id] = Object.keys(preKeys)
  return {
    registrationId: p.creds.registrationId,
    identityKey: B.generateSignalPubKey(p.creds.signedIdentityKey.public),
    signedPreKey: { keyId: p.creds.signedPreKey.keyId, publicKey: B.generateSignalPubKey(p.creds.signedPreKey.keyPair.public), signature: p.creds.signedPreKey.signature },
    preKey: { keyId: +id, publicKey: B.generateSignalPubKey(preKeys[id].public) },
  }
}

const plaintext = (text) => Buffer.concat([Buffer.from(B.proto.Message.encode({ conversation: text }).finish()), Buffer.alloc(3, 3)])

const { PreKeyWhisperMessage } = require('libsignal/src/protobufs.js')
const flipLastByte = (buffer) => {
  const copy = Buffer.from(buffer)
  copy[copy.length - 1] ^= 0xff
  return copy
}
// Flip the MAC trailer of the WhisperMessage inside a PreKeyWhisperMessage (the framing stays valid).
function tamperPkmsg(buffer) {
  const outer = PreKeyWhisperMessage.decode(buffer.subarray(1))
  outer.message = flipLastByte(outer.message)
  return Buffer.concat([buffer.subarray(0, 1), Buffer.from(PreKeyWhisperMessage.encode(outer).finish())])
}

// `count` stubs of messages whose MAC was flipped, each from a new sender (pkmsg path: libsignal's raw Bad MAC).
export async function badMacStubs(receiver, count) {
  const stubs = []
  for (let i = 0; i < count; i++) {
    const sender = party(`1555000${String(100 + i).padStart(4, '0')}@s.whatsapp.net`)
    await sender.repo.injectE2ESession({ jid: receiver.jid, session: await bundleOf(receiver) })
    const sent = await sender.repo.encryptMessage({ jid: receiver.jid, data: plaintext(`hello ${i}`) })
    const tampered = sent.type === 'pkmsg' ? tamperPkmsg(sent.ciphertext) : flipLastByte(sent.ciphertext)
    const node = {
      tag: 'message',
      attrs: { from: sender.jid, type: 'text', id: `3EB0${String(i).padStart(16, '0')}`, t: '1764043200', notify: 'x' },
      content: [{ tag: 'enc', attrs: { v: '2', type: sent.type }, content: tampered }],
    }
    const { fullMessage, decrypt } = B.decryptMessageNode(node, receiver.creds.me.id, '', receiver.repo, quiet)
    await decrypt()
    stubs.push(fullMessage)
  }
  return stubs
}


// One message from `sender` to a receiver whose bundle is given: the genuine ciphertext and the same one with its
// MAC flipped (what a live socket fails on with Bad MAC, then decrypts when the genuine one is re-sent).
export async function sealed(sender, receiverJid, bundle, text) {
  await sender.repo.injectE2ESession({ jid: receiverJid, session: bundle })
  const sent = await sender.repo.encryptMessage({ jid: receiverJid, data: plaintext(text) })
  const tampered = sent.type === 'pkmsg' ? tamperPkmsg(sent.ciphertext) : flipLastByte(sent.ciphertext)
  return { type: sent.type, genuine: sent.ciphertext, tampered }
}

export const messageNode = (from, id, type, ciphertext) => ({
  tag: 'message',
  attrs: { from, type: 'text', id, t: String(Math.floor(Date.now() / 1000)), notify: 'x' },
  content: [{ tag: 'enc', attrs: { v: '2', type }, content: ciphertext }],
})
