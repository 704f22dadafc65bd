// The official `openai` Node client, unmodified, on Veil's Responses and Conversations doors.
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
    name: 'get_weather',
    description: 'The weather in a city.',
    parameters: {
      type: 'object',
      properties: { city: { type: 'string' } },
      required: ['city'],
    },
  },
];

async function failure(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    return { class: err.constructor.name, status: err.status ?? null };
  }
}

// A response's text from its output items (a streamed event's response is the raw object,
// without the SDK's output_text convenience).
function textOf(response) {
  if (!response) return null;
  return response.output
    .filter((item) => item.type === 'message')
    .flatMap((item) => item.content)
    .filter((part) => part.type === 'output_text')
    .map((part) => part.text)
    .join('');
}

const summary = { sdk: 'openai', version: VERSION };

// A conversation by previous_response_id: whole, then streamed.
{
  const first = await client.responses.create({ model: MODEL, input: 'My name is Bea.' });
  const second = await client.responses.create({
    model: MODEL,
    input: 'What is my name?',
    previous_response_id: first.id,
  });
  const stream = await client.responses.create({
    model: MODEL,
    input: 'Say it again, streamed.',
    previous_response_id: second.id,
    stream: true,
  });
  const types = [];
  let text = '';
  let completed = null;
  for await (const event of stream) {
    if (!types.includes(event.type)) types.push(event.type);
    if (event.type === 'response.output_text.delta') text += event.delta;
    if (event.type === 'response.completed') completed = event.response;
  }
  const fetched = await client.responses.retrieve(second.id);
  summary.chain = {
    first: { id: first.id, object: first.object, status: first.status, text: first.output_text },
    second: { id: second.id, text: second.output_text, usage: second.usage },
    streamed: { types, text, completed_text: textOf(completed), id: completed?.id ?? null },
    retrieved: { id: fetched.id, text: fetched.output_text },
  };
}

// A function tool: the model calls it, the script answers with function_call_output.
{
  const asked = await client.responses.create({
    model: MODEL,
    input: 'Weather in Paris?',
    tools: TOOLS,
  });
  const call = asked.output.find((item) => item.type === 'function_call');
  const answered = await client.responses.create({
    model: MODEL,
    previous_response_id: asked.id,
    input: [{ type: 'function_call_output', call_id: call.call_id, output: 'sunny, 22 C (node)' }],
    tools: TOOLS,
  });
  summary.tool = {
    call: { name: call.name, arguments: JSON.parse(call.arguments), call_id: call.call_id },
    answer: answered.output_text,
  };
}

// A conversation made with items, then used by a response, listed and deleted.
{
  const conversation = await client.conversations.create({
    items: [{ type: 'message', role: 'user', content: 'Remember the colour teal.' }],
    metadata: { topic: 'colours' },
  });
  const reply = await client.responses.create({
    model: MODEL,
    input: 'Which colour?',
    conversation: conversation.id,
  });
  const items = [];
  for await (const item of client.conversations.items.list(conversation.id)) items.push(item);
  const retrieved = await client.conversations.retrieve(conversation.id);
  const deleted = await client.conversations.delete(conversation.id);
  summary.conversation = {
    id: conversation.id,
    metadata: retrieved.metadata,
    reply: reply.output_text,
    items: items.map((item) => item.role),
    deleted: deleted.deleted,
    gone: await failure(client.conversations.retrieve(conversation.id)),
  };
}

summary.errors = {
  wrong_key: await failure(
    new OpenAI({ baseURL: client.baseURL, apiKey: 'sk-wrong', maxRetries: 0 }).responses.create({
      model: MODEL,
      input: 'hi',
    }),
  ),
  unknown_model: await failure(client.responses.create({ model: 'no-such-model', input: 'hi' })),
  unknown_response: await failure(client.responses.retrieve('resp_bm8tc3VjaA')),
};

process.stdout.write(`${JSON.stringify(summary)}\n`);
