/**
 * The Export tab: a PCAP or pcapng file of the selected connections or of everything, with
 * the decrypted-port mapping, assembled from the `ExportCapture` stream into a download;
 * and the proxy's CA certificate (PEM or DER) from the CertificateAuthority service.
 */
import { useEffect, useState } from 'preact/hooks';
import { Format, type ExportSummary } from './gen/interpose/export/v1/export_pb';
import type { CaCertificate } from './gen/interpose/ca/v1/ca_pb';
import { ca, errText, exporter } from './api';
import { parsePortMap } from './format';

/** Saves bytes as a file through a temporary blob: URL (no server round trip). */
export function download(name: string, parts: BlobPart[], type: string): void {
  const url = URL.createObjectURL(new Blob(parts, { type }));
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

export function ExportTab(p: { active: boolean; selection: bigint[] }) {
  const [scope, setScope] = useState<'selection' | 'all'>(p.selection.length ? 'selection' : 'all');
  const [format, setFormat] = useState<Format>(Format.PCAPNG);
  const [ports, setPorts] = useState('443:80');
  const [original, setOriginal] = useState(false);
  const [busy, setBusy] = useState(false);
  const [note, setNote] = useState('');
  const [summary, setSummary] = useState<ExportSummary | undefined>();
  const [cert, setCert] = useState<CaCertificate | undefined>();

  useEffect(() => setScope(p.selection.length ? 'selection' : 'all'), [p.selection]);
  useEffect(() => {
    if (p.active && !cert) ca.getCaCertificate({}).then(setCert, (e) => setNote(`CA: ${errText(e)}`));
  }, [p.active]);

  async function run(e: Event) {
    e.preventDefault();
    setNote('');
    setSummary(undefined);
    let decryptedPorts;
    try {
      decryptedPorts = parsePortMap(ports);
    } catch (e2) {
      setNote(errText(e2));
      return;
    }
    const ids = scope === 'selection' ? p.selection : [];
    if (scope === 'selection' && !ids.length) {
      setNote('No connections are selected: pick some in the Connections tab, or export everything.');
      return;
    }
    setBusy(true);
    try {
      const chunks: Uint8Array<ArrayBuffer>[] = [];
      let sum: ExportSummary | undefined;
      for await (const c of exporter.exportCapture({ connIds: ids, format, decryptedPorts, original })) {
        if (c.data.length) chunks.push(c.data as Uint8Array<ArrayBuffer>);
        if (c.summary) sum = c.summary;
      }
      const ext = format === Format.PCAPNG ? 'pcapng' : 'pcap';
      const name = ids.length === 1 ? `interpose-${ids[0]}.${ext}` : ids.length ? `interpose-${ids.length}-connections.${ext}` : `interpose-all.${ext}`;
      download(name, chunks, 'application/vnd.tcpdump.pcap');
      setSummary(sum);
      setNote(`Saved ${name}.`);
    } catch (e2) {
      setNote(`Export failed: ${errText(e2)}`);
    } finally {
      setBusy(false);
    }
  }

  return (
    <div class="tab export" hidden={!p.active}>
      <h3>Export a capture</h3>
      <form class="form" onSubmit={run}>
        <label>
          <input type="radio" name="scope" checked={scope === 'selection'} onChange={() => setScope('selection')} /> the {p.selection.length} selected connection{p.selection.length === 1 ? '' : 's'}
          {p.selection.length > 0 && p.selection.length <= 20 && ` (${p.selection.join(', ')})`}
        </label>
        <label>
          <input type="radio" name="scope" data-testid="scope-all" checked={scope === 'all'} onChange={() => setScope('all')} /> every connection in the history
        </label>
        <label>
          Format{' '}
          <select data-testid="export-format" value={String(format)} onChange={(e) => setFormat(Number((e.target as HTMLSelectElement).value))}>
            <option value={String(Format.PCAPNG)}>pcapng (comments per connection, ns timestamps)</option>
            <option value={String(Format.PCAP)}>PCAP (classic)</option>
          </select>
        </label>
        <label>
          Decrypted ports <input data-testid="export-ports" value={ports} onInput={(e) => setPorts((e.target as HTMLInputElement).value)} />{' '}
          <small>server port of a decrypted TLS connection → port written, so Wireshark dissects the inner protocol (e.g. 443:80)</small>
        </label>
        <label>
          <input type="checkbox" checked={original} onChange={(e) => setOriginal((e.target as HTMLInputElement).checked)} /> bytes as received (before edits; include dropped packets)
        </label>
        <div>
          <button type="submit" data-testid="export-run" disabled={busy}>{busy ? 'Exporting…' : 'Export'}</button>
        </div>
      </form>
      {note && <div class="note" data-testid="export-note">{note}</div>}
      {summary && (
        <p data-testid="export-summary">
          {summary.connections.toString()} connections, {summary.packets.toString()} packets, {summary.fileBytes.toString()} bytes
          {summary.placeholderConnections > 0n && `; ${summary.placeholderConnections} with dummy addresses and ports (records cleared)`}
        </p>
      )}
      <h3>CA certificate</h3>
      {cert ? (
        <div data-testid="ca">
          <p>
            {cert.subject} · SHA-256 <code>{cert.sha256}</code>
          </p>
          <button onClick={() => download('interpose-ca.pem', [cert.pem], 'application/x-pem-file')}>Download PEM</button>{' '}
          <button onClick={() => download('interpose-ca.der', [cert.der as Uint8Array<ArrayBuffer>], 'application/x-x509-ca-cert')}>Download DER</button>
          <p class="hint">
            Install it as a trusted root in the program under test (e.g. <code>curl --cacert interpose-ca.pem</code>, Firefox: Settings → Certificates → Import,
            Debian: copy to /usr/local/share/ca-certificates/interpose.crt and run update-ca-certificates).
          </p>
        </div>
      ) : (
        <p class="hint">Loading the CA certificate…</p>
      )}
    </div>
  );
}
