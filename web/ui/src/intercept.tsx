/**
 * The Intercept tab: the configuration (on/off, direction, filters, replace rules), the live
 * held queue from `WatchHeld` with each packet's connection status, and the editor with
 * Forward, Forward edited and Drop (keys F, E, D; Ctrl+Enter forwards the edit).
 *
 * A held packet whose connection has closed shows who closed it and cannot be forwarded:
 * the service refuses it (FAILED_PRECONDITION) and the page disables the buttons first.
 */
import { useEffect, useRef, useState } from 'preact/hooks';
import type { HeldPacket, InterceptConfig } from './gen/interpose/intercept/v1/intercept_pb';
import { HeldEvent_Kind } from './gen/interpose/intercept/v1/intercept_pb';
import { errText, intercept, isCanceled } from './api';
import {
  CLOSED_BY_NAMES,
  DIRECTION_NAMES,
  hexDump,
  parseHex,
  toHex,
  utf8OrUndefined,
} from './format';

function statusOf(h: HeldPacket): string {
  if (h.connStatus === 2) {
    const by = CLOSED_BY_NAMES[h.closedBy] || 'unknown';
    return `disconnected (closed by ${by}${h.closeReason ? `: ${h.closeReason}` : ''})`;
  }
  return 'active';
}

export function InterceptTab(p: { active: boolean; openConn: (id: bigint) => void }) {
  const [held, setHeld] = useState<HeldPacket[]>([]);
  const [cfg, setCfg] = useState<InterceptConfig | undefined>();
  const [err, setErr] = useState('');
  const [note, setNote] = useState('');
  const [pickedId, setPickedId] = useState<bigint | undefined>();
  const [mode, setMode] = useState<'hex' | 'text'>('text');
  const [edit, setEdit] = useState('');
  const heldRef = useRef(new Map<bigint, HeldPacket>());

  // The live queue.
  useEffect(() => {
    const abort = new AbortController();
    (async () => {
      while (!abort.signal.aborted) {
        try {
          heldRef.current = new Map();
          for await (const ev of intercept.watchHeld({}, { signal: abort.signal })) {
            const m = heldRef.current;
            if ((ev.kind === HeldEvent_Kind.ADDED || ev.kind === HeldEvent_Kind.UPDATED) && ev.held) {
              m.set(ev.held.heldId, ev.held);
            } else if (ev.kind === HeldEvent_Kind.REMOVED) {
              m.delete(ev.heldId);
            }
            setHeld([...m.values()].sort((a, b) => (a.heldId < b.heldId ? -1 : 1)));
            setErr('');
          }
        } catch (e) {
          if (abort.signal.aborted || isCanceled(e)) return;
          setErr(`The held queue lost the intercept service (${errText(e)}); retrying.`);
        }
        await new Promise((r) => setTimeout(r, 1000));
      }
    })();
    void intercept.getConfig({}).then(setCfg, (e) => setErr(errText(e)));
    return () => abort.abort();
  }, []);

  const picked = held.find((h) => h.heldId === pickedId) ?? held[0];
  const pickedData = picked?.packet?.data ?? new Uint8Array();

  // A newly picked packet loads into the editor.
  useEffect(() => {
    if (!picked) return;
    const text = utf8OrUndefined(pickedData);
    if (text !== undefined && mode === 'text') setEdit(text);
    else {
      setMode('hex');
      setEdit(toHex(pickedData));
    }
  }, [picked?.heldId]);

  function switchMode(m: 'hex' | 'text') {
    try {
      const b = currentBytes();
      if (m === 'text') {
        const t = utf8OrUndefined(b);
        if (t === undefined) {
          setNote('These bytes are not UTF-8 text; edit them as hex.');
          return;
        }
        setEdit(t);
      } else setEdit(toHex(b));
      setMode(m);
    } catch (e) {
      setNote(errText(e));
    }
  }

  function currentBytes(): Uint8Array {
    return mode === 'hex' ? parseHex(edit) : new TextEncoder().encode(edit);
  }

  const closed = picked?.connStatus === 2;

  async function act(kind: 'forward' | 'edited' | 'drop') {
    if (!picked) return;
    setNote('');
    try {
      if (kind === 'drop') await intercept.drop({ heldId: picked.heldId });
      else if (kind === 'forward') await intercept.forward({ heldId: picked.heldId });
      else await intercept.forward({ heldId: picked.heldId, replace: true, data: currentBytes() });
      setNote(`${kind === 'drop' ? 'Dropped' : 'Forwarded'} held packet ${picked.heldId}${kind === 'edited' ? ' (edited)' : ''}.`);
      setPickedId(undefined);
    } catch (e) {
      setNote(errText(e));
    }
  }

  function onKey(e: KeyboardEvent) {
    if (!p.active || !picked) return;
    const inEditor = (e.target as HTMLElement).tagName === 'TEXTAREA' || (e.target as HTMLElement).tagName === 'INPUT';
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      if (!closed) void act('edited');
      return;
    }
    if (inEditor) return;
    if (e.key === 'f' && !closed) void act('forward');
    else if (e.key === 'e' && !closed) void act('edited');
    else if (e.key === 'd') void act('drop');
    else if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      const i = held.findIndex((h) => h.heldId === picked.heldId);
      const j = Math.max(0, Math.min(held.length - 1, i + (e.key === 'ArrowDown' ? 1 : -1)));
      setPickedId(held[j]?.heldId);
    }
  }
  useEffect(() => {
    window.addEventListener('keydown', onKey);
    return () => window.removeEventListener('keydown', onKey);
  });

  return (
    <div class="tab intercept" hidden={!p.active}>
      {cfg && <ConfigForm cfg={cfg} setCfg={setCfg} setErr={setErr} />}
      {err && <div class="error">{err}</div>}
      <div class="split">
        <div class="list-pane">
          <h3>Held packets ({held.length})</h3>
          <div class="held-list" data-testid="held-list">
            {held.map((h) => (
              <div
                key={h.heldId.toString()}
                class={`held row ${h === picked ? 'sel' : ''} ${h.connStatus === 2 ? 'closed' : ''}`}
                data-held={h.heldId.toString()}
                data-conn={h.packet?.connId.toString()}
                onClick={() => {
                  setPickedId(h.heldId);
                  setNote('');
                }}
              >
                <span>#{h.heldId.toString()}</span>
                <span>
                  conn{' '}
                  <a href="#" class="conn-link" onClick={(e) => { e.preventDefault(); if (h.packet) p.openConn(h.packet.connId); }}>
                    {h.packet?.connId.toString()}
                  </a>
                </span>
                <span>{DIRECTION_NAMES[h.packet?.direction ?? 0]}</span>
                <span>{h.dstHost}:{h.dstPort}</span>
                <span>{h.packet?.data.length ?? 0} B</span>
                <span class="held-status" data-testid="held-status">{statusOf(h)}</span>
              </div>
            ))}
          </div>
        </div>
        <div class="viewer">
          {picked ? (
            <div data-testid="held-editor">
              <p>
                Held #{picked.heldId.toString()} · connection {picked.packet?.connId.toString()} · {DIRECTION_NAMES[picked.packet?.direction ?? 0]} ·{' '}
                <b class={closed ? 'bad' : 'ok'} data-testid="picked-status">{statusOf(picked)}</b>
              </p>
              {closed && (
                <p class="warning" data-testid="closed-warning">
                  This connection has closed: the packet cannot be forwarded. Drop it to clear it from the queue.
                </p>
              )}
              <pre class="dump">{hexDump(pickedData).join('\n')}</pre>
              <div class="toolbar">
                <label><input type="radio" name="mode" checked={mode === 'text'} onChange={() => switchMode('text')} /> text</label>
                <label><input type="radio" name="mode" data-testid="mode-hex" checked={mode === 'hex'} onChange={() => switchMode('hex')} /> hex</label>
              </div>
              <textarea data-testid="held-edit" class="editor" value={edit} onInput={(e) => setEdit((e.target as HTMLTextAreaElement).value)} />
              <div class="buttons">
                <button data-testid="forward" disabled={closed} onClick={() => act('forward')}>Forward (F)</button>
                <button data-testid="forward-edited" disabled={closed} onClick={() => act('edited')}>Forward edited (E, Ctrl+Enter)</button>
                <button data-testid="drop" class="danger" onClick={() => act('drop')}>Drop (D)</button>
              </div>
            </div>
          ) : (
            <p class="hint">No packet is held. Turn intercept on and send traffic through the proxy.</p>
          )}
          {note && <div class="note" data-testid="intercept-note">{note}</div>}
        </div>
      </div>
    </div>
  );
}

function ConfigForm(p: { cfg: InterceptConfig; setCfg: (c: InterceptConfig) => void; setErr: (s: string) => void }) {
  const c = p.cfg;
  const [hosts, setHosts] = useState(c.hosts.join(', '));
  const [ports, setPorts] = useState(c.ports.join(', '));
  const [contains, setContains] = useState(new TextDecoder().decode(c.contains));
  const [enabled, setEnabled] = useState(c.enabled);
  const [direction, setDirection] = useState(c.direction);
  const [rule, setRule] = useState({ pattern: '', replacement: '', direction: 0 });
  // Saves run one after another, so a quick on/off/on reaches the service in order.
  const chain = useRef<Promise<void>>(Promise.resolve());

  function save(nextEnabled: boolean, nextDirection: number) {
    setEnabled(nextEnabled);
    setDirection(nextDirection);
    const portList: number[] = [];
    for (const s of ports.split(/[\s,]+/).filter((x) => x)) {
      const n = Number(s);
      if (!Number.isInteger(n) || n < 1 || n > 65535) {
        p.setErr(`"${s}" is not a port (1 to 65535).`);
        return;
      }
      portList.push(n);
    }
    const config = {
      ...c,
      enabled: nextEnabled,
      direction: nextDirection,
      hosts: hosts.split(/[\s,]+/).filter((x) => x),
      ports: portList,
      contains: new TextEncoder().encode(contains),
      rules: [],
    };
    chain.current = chain.current.then(async () => {
      try {
        p.setCfg(await intercept.setConfig({ config }));
        p.setErr('');
      } catch (e) {
        p.setErr(errText(e));
      }
    });
  }

  async function addRule(e: Event) {
    e.preventDefault();
    if (!rule.pattern) {
      p.setErr('A replace rule needs a pattern to find.');
      return;
    }
    try {
      await intercept.addRule({
        rule: {
          direction: rule.direction,
          pattern: new TextEncoder().encode(rule.pattern),
          replacement: new TextEncoder().encode(rule.replacement),
        },
      });
      p.setCfg(await intercept.getConfig({}));
      setRule({ pattern: '', replacement: '', direction: 0 });
    } catch (e2) {
      p.setErr(errText(e2));
    }
  }

  async function removeRule(id: bigint) {
    try {
      await intercept.removeRule({ id });
      p.setCfg(await intercept.getConfig({}));
    } catch (e) {
      p.setErr(errText(e));
    }
  }

  const dec = new TextDecoder();
  return (
    <div class="config">
      <div class="toolbar">
        <label class="switch">
          <input type="checkbox" data-testid="intercept-enabled" checked={c.enabled} onChange={(e) => save((e.target as HTMLInputElement).checked, direction)} />{' '}
          Intercept {c.enabled ? 'on' : 'off'}
        </label>
        <label>
          Direction{' '}
          <select data-testid="intercept-direction" value={String(direction)} onChange={(e) => save(enabled, Number((e.target as HTMLSelectElement).value))}>
            <option value="0">both</option>
            <option value="1">c2s</option>
            <option value="2">s2c</option>
          </select>
        </label>
        <label>Hosts <input value={hosts} placeholder="any" onInput={(e) => setHosts((e.target as HTMLInputElement).value)} /></label>
        <label>Ports <input data-testid="intercept-ports" value={ports} placeholder="any" onInput={(e) => setPorts((e.target as HTMLInputElement).value)} /></label>
        <label>Contains <input value={contains} placeholder="any" onInput={(e) => setContains((e.target as HTMLInputElement).value)} /></label>
        <button data-testid="intercept-apply" onClick={() => save(enabled, direction)}>Apply filters</button>
      </div>
      <form class="toolbar" onSubmit={addRule}>
        <span>Replace rules:</span>
        {c.rules.map((r) => (
          <span class="rule" key={r.id.toString()}>
            {DIRECTION_NAMES[r.direction] || 'both'}: "{dec.decode(r.pattern)}" → "{dec.decode(r.replacement)}"{' '}
            <button type="button" onClick={() => removeRule(r.id)} title="Remove">×</button>
          </span>
        ))}
        <input placeholder="find" value={rule.pattern} onInput={(e) => setRule({ ...rule, pattern: (e.target as HTMLInputElement).value })} />
        <input placeholder="replace with" value={rule.replacement} onInput={(e) => setRule({ ...rule, replacement: (e.target as HTMLInputElement).value })} />
        <select value={String(rule.direction)} onChange={(e) => setRule({ ...rule, direction: Number((e.target as HTMLSelectElement).value) })}>
          <option value="0">both</option>
          <option value="1">c2s</option>
          <option value="2">s2c</option>
        </select>
        <button type="submit">Add rule</button>
      </form>
    </div>
  );
}
