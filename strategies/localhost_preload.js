// Node preload that keeps the NNI manager (and the TensorBoard it may start) on the loopback interface.
//
// Loaded through NODE_OPTIONS="--require <this file>" by strategies/nni_local.py (the manager) and by the
// worker python of strategies/nni_remote.py (NNI's trial keeper on every remote host). NNI 3.0 calls
// `app.listen(port)` (all interfaces) and starts TensorBoard with `--bind_all`; both are rewritten here:
//   * every net.Server#listen on a TCP port is forced to the first address of PAIF_BIND_HOST (a comma-separated
//     list, default 127.0.0.1); each further address gets a listener on the same port that hands its
//     connections to the same server (the manager of a remote sweep: 127.0.0.1 for nnictl + nniManagerIp for
//     the workers, and no other interface);
//   * a child process argument `--bind_all` becomes `--host=<first address>`;
//   * DNS results prefer IPv4, so clients that dial "localhost" reach the IPv4 listener;
//   * with PAIF_NNI_HOME set, os.homedir() is that folder (NNI's experiment index lives there) while child
//     processes get the user's HOME (PAIF_USER_HOME) back.
'use strict';
const net = require('net');
const dns = require('dns');
const os = require('os');
const childProcess = require('child_process');

const HOSTS = (process.env.PAIF_BIND_HOST || '127.0.0.1').split(',').map((h) => h.trim()).filter(Boolean);
const HOST = HOSTS.length ? HOSTS[0] : '127.0.0.1';

// NNI's home: strategies/nni_local.py runs nnictl with HOME=<project>/runs (PAIF_NNI_HOME) so that NNI's
// experiment index (<home>/nni-experiments/.experiment) stays in the project. The manager keeps that home, but
// its children (the trials) get the user's HOME back.
if (process.env.PAIF_NNI_HOME) {
  const nniHome = process.env.PAIF_NNI_HOME;
  os.homedir = () => nniHome;
  if (process.env.PAIF_USER_HOME) {
    process.env.HOME = process.env.PAIF_USER_HOME;
  }
}

if (typeof dns.setDefaultResultOrder === 'function') {
  dns.setDefaultResultOrder('ipv4first');
}

const originalListen = net.Server.prototype.listen;
net.Server.prototype.listen = function pinnedListen(...args) {
  const first = args[0];
  const isPort = (v) => typeof v === 'number' || (typeof v === 'string' && /^\d+$/.test(v));
  let tcp = true;
  if (first !== null && typeof first === 'object' && !Array.isArray(first)) {
    // listen(options[, cb]); leave unix sockets and inherited handles alone.
    if (first.path === undefined && first.fd === undefined && first._handle === undefined && !(first instanceof net.Server)) {
      args[0] = Object.assign({}, first, { host: HOST });
    } else {
      tcp = false;
    }
  } else if (isPort(first)) {
    // listen(port[, host][, backlog][, cb])
    if (args.length > 1 && (typeof args[1] === 'string' || args[1] === undefined || args[1] === null)) {
      args[1] = HOST;
    } else {
      args.splice(1, 0, HOST);
    }
  } else if (first === undefined || typeof first === 'function') {
    // listen([cb]) -> random port on HOST
    args.splice(0, first === undefined ? 1 : 0, 0, HOST);
  } else {
    tcp = false;  // a unix socket path or a handle
  }
  if (tcp && HOSTS.length > 1) {
    this.once('listening', () => mirror(this));
  }
  return originalListen.apply(this, args);
};

// Listen on the same port at every further address of PAIF_BIND_HOST; connections go to `server`.
function mirror(server) {
  const port = server.address().port;
  for (const host of HOSTS.slice(1)) {
    const extra = net.createServer((socket) => server.emit('connection', socket));
    extra.on('error', (err) => server.emit('error', err));  // e.g. the address is not on this machine
    originalListen.call(extra, port, host);
    server.once('close', () => extra.close());
  }
}

function rewriteArg(arg) {
  return typeof arg === 'string' ? arg.replace(/--bind_all\b/g, `--host=${HOST}`) : arg;
}

for (const name of ['spawn', 'spawnSync', 'execFile', 'execFileSync', 'exec', 'execSync']) {
  const original = childProcess[name];
  childProcess[name] = function pinnedChild(command, ...rest) {
    const cmd = rewriteArg(command);
    if (Array.isArray(rest[0])) {
      rest[0] = rest[0].map(rewriteArg);
    }
    return original.call(this, cmd, ...rest);
  };
}
