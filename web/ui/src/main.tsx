/**
 * The Interpose web view: the login form, the tabs and the links between them. Every piece
 * of data comes from the services over gRPC-web (see api.ts).
 */
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import './style.css';
import { currentToken, errText, initToken, onTokenChange, registry, setToken } from './api';
import { conns } from './store';
import { ConnectionsTab } from './connections';
import { HistoryTab, type Query } from './history';
import { InterceptTab } from './intercept';
import { ExportTab } from './export';

type Tab = 'connections' | 'history' | 'intercept' | 'export';

function Login() {
  const [value, setValue] = useState('');
  const [err, setErr] = useState('');
  async function submit(e: Event) {
    e.preventDefault();
    const t = value.trim();
    if (!t) {
      setErr('Enter the token.');
      return;
    }
    try {
      // Checks the token before keeping it and showing the tabs.
      await registry.connectionStats({}, { headers: { authorization: `Bearer ${t}` } });
      setToken(t);
    } catch (e2) {
      setErr(`That token was not accepted (${errText(e2)}).`);
    }
  }
  return (
    <form class="login" data-testid="login" onSubmit={submit}>
      <h2>Interpose</h2>
      <p>
        Enter the API token. <code>interpose up</code> prints a <code>web=</code> URL that carries it, and keeps it in the file
        named by <code>token=</code> on its ready line.
      </p>
      <input type="password" autocomplete="off" data-testid="token-input" value={value} onInput={(e) => setValue((e.target as HTMLInputElement).value)} />
      <button type="submit">Sign in</button>
      {err && <div class="error" data-testid="login-error">{err}</div>}
    </form>
  );
}

function App() {
  const [token, setTok] = useState(currentToken());
  const [tab, setTab] = useState<Tab>('connections');
  const [query, setQuery] = useState<Query>({ connIds: [], direction: 0, contains: '', hex: false });
  const [focus, setFocus] = useState<{ id: bigint; n: number } | undefined>();
  const [exportSel, setExportSel] = useState<bigint[]>([]);

  useEffect(() => onTokenChange(() => setTok(currentToken())), []);
  useEffect(() => {
    if (token) conns.start();
    else conns.stop();
    return () => conns.stop();
  }, [token]);

  if (!token) return <Login />;

  const nav = {
    showHistory: (ids: bigint[]) => {
      setQuery({ connIds: [...ids].sort((a, b) => (a < b ? -1 : 1)), direction: 0, contains: '', hex: false });
      setTab('history');
    },
    exportSelection: (ids: bigint[]) => {
      setExportSel([...ids].sort((a, b) => (a < b ? -1 : 1)));
      setTab('export');
    },
  };
  const openConn = (id: bigint) => {
    setTab('connections');
    setFocus({ id, n: (focus?.n ?? 0) + 1 });
    if (!conns.records.has(id)) {
      registry.getConnection({ id }).then(
        (c) => conns.adopt(c),
        () => undefined, // A cleared record: the history still has its packets.
      );
    }
  };
  const tabs: [Tab, string][] = [
    ['connections', 'Connections'],
    ['history', 'Proxy History'],
    ['intercept', 'Intercept'],
    ['export', 'Export & CA'],
  ];
  return (
    <div class="app">
      <nav class="tabs">
        <span class="brand">Interpose</span>
        {tabs.map(([k, label]) => (
          <button key={k} data-tab={k} class={tab === k ? 'on' : ''} onClick={() => {
            if (k === 'export') setExportSel([...conns.selected].sort((a, b) => (a < b ? -1 : 1)));
            setTab(k);
          }}>
            {label}
          </button>
        ))}
        <span class="grow" />
        <button class="link" onClick={() => setToken(undefined)}>Sign out</button>
      </nav>
      <ConnectionsTab active={tab === 'connections'} nav={nav} focus={focus} />
      <HistoryTab active={tab === 'history'} query={query} setQuery={setQuery} openConn={openConn} />
      <InterceptTab active={tab === 'intercept'} openConn={openConn} />
      <ExportTab active={tab === 'export'} selection={exportSel} />
    </div>
  );
}

initToken();
// The benchmark (tests/src/bin/bench-web.rs) reads the store's live events through this.
(window as unknown as { __interpose: unknown }).__interpose = { conns };
const root = document.getElementById('app');
if (root) render(<App />, root);
