// Drive twisted_rt with the real pusher-js (and Laravel Echo over it), as an app would.
// Usage: node pusher_client.js <pusher|echo> <port> <key> <secret> <user_id>
// Prints one JSON line per thing that happened: {"ready": socket_id} once every
// channel is subscribed, then {"got": ...} for each event; exits after "bye".
'use strict';
const crypto = require('crypto');
const Pusher = require('pusher-js');

const [mode, port, key, secret, userId] = process.argv.slice(2);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

// the app's own auth endpoint, done in-process: sign as Pusher's server libraries do
function authorize(socketId, channel) {
  let text = `${socketId}:${channel}`;
  const result = {};
  if (channel.startsWith('presence-')) {
    result.channel_data = JSON.stringify({ user_id: userId, user_info: { name: userId.toUpperCase() } });
    text += `:${result.channel_data}`;
  }
  result.auth = `${key}:${crypto.createHmac('sha256', secret).update(text).digest('hex')}`;
  return result;
}

const options = {
  wsHost: '127.0.0.1',
  wsPort: Number(port),
  forceTLS: false,
  enabledTransports: ['ws'],
  disableStats: true,
  cluster: 'mt1',
  channelAuthorization: {
    customHandler: ({ socketId, channelName }, callback) => callback(null, authorize(socketId, channelName)),
  },
};

const timer = setTimeout(() => { out({ error: 'timeout' }); process.exit(2); }, 20000);
function done() { clearTimeout(timer); out({ bye: true }); process.exit(0); }

if (mode === 'pusher') {
  const pusher = new Pusher(key, options);
  let pending = 3;
  const subscribed = () => { if (--pending === 0) out({ ready: pusher.connection.socket_id }); };
  pusher.connection.bind('error', (e) => out({ connection_error: e && e.data ? e.data : String(e) }));
  const pub = pusher.subscribe('orders.1');
  const priv = pusher.subscribe('private-orders');
  const pres = pusher.subscribe('presence-room');
  pub.bind('pusher:subscription_succeeded', subscribed);
  priv.bind('pusher:subscription_succeeded', subscribed);
  pres.bind('pusher:subscription_succeeded', (members) => { out({ members: members.count, me: members.me.id }); subscribed(); });
  pres.bind('pusher:member_added', (m) => out({ member_added: m.id, info: m.info }));
  pres.bind('pusher:member_removed', (m) => out({ member_removed: m.id }));
  pub.bind('order-shipped', (data) => out({ got: 'order-shipped', channel: 'orders.1', data }));
  priv.bind('secret', (data) => out({ got: 'secret', channel: 'private-orders', data }));
  priv.bind('client-typing', (data) => out({ got: 'client-typing', data }));
  pub.bind('bye', done);
  process.stdin.on('data', (line) => {
    const msg = JSON.parse(String(line));
    if (msg.whisper) priv.trigger('client-typing', { from: userId });
  });
} else {
  const Echo = require('laravel-echo').default;
  const echo = new Echo({ broadcaster: 'pusher', key, Pusher, ...options });
  let pending = 3;
  const subscribed = () => { if (--pending === 0) out({ ready: echo.socketId() }); };
  echo.channel('orders.1').subscribed(subscribed)
    .listen('.order-shipped', (e) => out({ got: 'order-shipped', data: e }))
    .listen('OrderPaid', (e) => out({ got: 'OrderPaid', data: e }))
    .listen('.bye', done);
  echo.private('orders').subscribed(subscribed).listen('.secret', (e) => out({ got: 'secret', data: e }));
  echo.join('room')
    .here((users) => { out({ here: users.map((u) => u.name).sort() }); subscribed(); })
    .joining((u) => out({ joining: u.name }))
    .leaving((u) => out({ leaving: u.name }));
}
