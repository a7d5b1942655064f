/**
 * A slowloris in a process of its own, for the HTTP slow-client tests:
 *
 *   node dist/test/helpers/slowloris.js PORT CONNECTIONS LOCAL_ADDRESS
 *
 * Keeps CONNECTIONS connections to 127.0.0.1:PORT open from LOCAL_ADDRESS (any of 127/8 is this
 * machine), each sending a request's headers one line a second and never finishing them, and
 * opens a new one whenever one is closed. Every second it prints {"open":N,"closed":M}: the
 * connections open now, and how many the server has closed so far. Runs until killed.
 */
import net from 'node:net';

const [portText, countText, localAddress = '127.0.0.1'] = process.argv.slice(2);
const port = Number(portText);
const count = Number(countText);
if (!Number.isInteger(port) || !Number.isInteger(count)) {
  process.stderr.write('usage: slowloris PORT CONNECTIONS LOCAL_ADDRESS\n');
  process.exit(2);
}

let open = 0;
let closed = 0;

function attack(): void {
  const socket = net.connect({ host: '127.0.0.1', port, localAddress });
  let connected = false;
  let drip: NodeJS.Timeout | undefined;
  socket.on('connect', () => {
    connected = true;
    open++;
    socket.write('GET /v1/kernels HTTP/1.1\r\nHost: localhost\r\n');
    drip = setInterval(() => socket.write('X-Slow: 1\r\n'), 1000);
  });
  socket.on('error', () => {});
  socket.on('close', () => {
    clearInterval(drip);
    if (connected) open--;
    closed++;
    setImmediate(attack); // reconnect at once: the harshest kind of slow client
  });
}

for (let i = 0; i < count; i++) attack();
setInterval(() => process.stdout.write(JSON.stringify({ open, closed }) + '\n'), 1000);
