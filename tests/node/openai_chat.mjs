// The official `openai` Node client, unmodified, on Veil's Chat Completions door.
// tests/test_node_clients.py runs it with VEIL_URL (the server's root) and VEIL_KEY set
// and checks the JSON summary it prints, and what the upstream behind Veil received.
import OpenAI from 'openai';
import { VERSION } from 'openai/version';

const client = new OpenAI({
  baseURL: `${process.env.VEIL_URL}/v1`,
  apiKey: process.env.VEIL_KEY,
  maxRetries: 0,
  timeout: 30_000,
});
const MODEL = 'veil';
const TOOLS = [
  {
    type: 'function',
    function: {
      name: 'get_weather',
      description: 'The weather in a city.',
      parameters: {
        type: 'object',
        properties: { city: { type: 'string' } },
        required: ['city'],
      },
    },
  },
];

const user = (content) => ({ role: 'user', content });

/** A streamed answer, added up from its chunks (text, tool calls, session ids seen). */
async function collect(stream) {
  const out = { chunks: 0, content: '', finish_reason: null, session_ids: [], tool_calls: [] };
  for await (const chunk of stream) {
    out.chunks += 1;
    if (chunk.session_id !== undefined && !out.session_ids.includes(chunk.session_id)) {
      out.session_ids.push(chunk.session_id);
    }
    for (const choice of chunk.choices) {
      out.content += choice.delta?.content ?? '';
      for (const piece of choice.delta?.tool_calls ?? []) {
        const call = (out.tool_calls[piece.index] ??= {
          id: '',
          type: 'function',
          function: { name: '', arguments: '' },
        });
        call.id += piece.id ?? '';
        call.function.name += piece.function?.name ?? '';
        call.function.arguments += piece.function?.arguments ?? '';
      }
      if (choice.finish_reason) out.finish_reason = choice.finish_reason;
    }
  }
  return out;
}

async function failure(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    return {
      class: err.constructor.name,
      is_api_error: err instanceof OpenAI.APIError,
      status: err.status ?? null,
    };
  }
}

const summary = { sdk: 'openai', version: VERSION };

// One conversation: a whole answer, then a streamed one naming the session in the body.
{
  const { data, response } = await client.chat.completions
    .create({ model: MODEL, messages: [user('My name is Ann.')] })
    .withResponse();
  const sid = data.session_id;
  const { data: stream, response: streamed } = await client.chat.completions
    .create({ model: MODEL, messages: [user('I like tea.')], stream: true, session_id: sid })
    .withResponse();
  const second = await collect(stream);
  summary.conversation = {
    first: {
      content: data.choices[0].message.content,
      finish_reason: data.choices[0].finish_reason,
      object: data.object,
      session_id: sid,
      header: response.headers.get('x-session-id'),
      total_tokens: data.usage?.total_tokens ?? null,
    },
    second: { ...second, header: streamed.headers.get('x-session-id') },
  };
}

// A client tool, both ways: the model asks for it, the script answers with the tool's
// result in the session (only the new message), and the model answers.
summary.tools = {};
for (const mode of ['whole', 'streamed']) {
  const ask = [user(`Weather in Paris? (${mode})`)];
  let asked;
  if (mode === 'whole') {
    const data = await client.chat.completions.create({ model: MODEL, messages: ask, tools: TOOLS });
    const { message, finish_reason } = data.choices[0];
    asked = { session_id: data.session_id, finish_reason, tool_calls: message.tool_calls };
  } else {
    const got = await collect(
      await client.chat.completions.create({ model: MODEL, messages: ask, tools: TOOLS, stream: true }),
    );
    asked = { session_id: got.session_ids[0], finish_reason: got.finish_reason, tool_calls: got.tool_calls };
  }
  const call = asked.tool_calls[0];
  const result = { role: 'tool', tool_call_id: call.id, content: `sunny, 21 C (${mode})` };
  const body = { model: MODEL, messages: [result], tools: TOOLS, session_id: asked.session_id };
  let answered;
  if (mode === 'whole') {
    const data = await client.chat.completions.create(body);
    answered = {
      session_id: data.session_id,
      finish_reason: data.choices[0].finish_reason,
      content: data.choices[0].message.content,
    };
  } else {
    const got = await collect(await client.chat.completions.create({ ...body, stream: true }));
    answered = { session_id: got.session_ids[0], finish_reason: got.finish_reason, content: got.content };
  }
  summary.tools[mode] = {
    asked: {
      session_id: asked.session_id,
      finish_reason: asked.finish_reason,
      call: { id: call.id, name: call.function.name, arguments: JSON.parse(call.function.arguments) },
    },
    answered,
  };
}

// Errors come as the client's own classes.
summary.errors = {
  wrong_key: await failure(
    new OpenAI({ baseURL: client.baseURL, apiKey: 'sk-wrong', maxRetries: 0 }).chat.completions.create({
      model: MODEL,
      messages: [user('hi')],
    }),
  ),
  unknown_model: await failure(
    client.chat.completions.create({ model: 'no-such-model', messages: [user('hi')] }),
  ),
  unknown_model_streamed: await failure(
    client.chat.completions.create({ model: 'no-such-model', messages: [user('hi')], stream: true }),
  ),
};

process.stdout.write(`${JSON.stringify(summary)}\n`);
